"""guidellm's synthetic fixed-length load test against the real server (prompt 32 tokens, output 64, 16 concurrent
streams): every response is exactly 64 tokens (guidellm sends ignore_eos), none fails, and guidellm's request and
token counts equal the server's own /metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import running_server
from reliability.conftest import metric, scrape

ROOT = Path(__file__).resolve().parents[1]
GUIDELLM = shutil.which("guidellm") or str(ROOT / ".venv/bin/guidellm")
REQUESTS = 32


@pytest.mark.skipif(not Path(GUIDELLM).exists(), reason="guidellm is installed by scripts/setup.sh --test")
def test_fixed_length_load_run_completes_at_64_tokens(tmp_path):
    with running_server() as base:
        before = scrape(base)
        report = tmp_path / "guidellm.json"
        cmd = [GUIDELLM, "run", "--backend", f"kind=openai_http,target={base},model=tiny-text,"
               "request_format=/v1/completions", "--profile", "kind=concurrent,streams=16",
               "--constraint", f"kind=max_requests,count={REQUESTS}",
               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=64",
               "--tokenizer", f"kind=huggingface_auto,model={ROOT / 'models/tiny-text'}",
               "--output", f"kind=json,path={report}", "--disable-console-interactive"]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        after = scrape(base)
    bench = json.loads(report.read_text())["benchmarks"][0]
    ok = bench["requests"]["successful"]
    assert bench["metrics"]["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0,
                                                  "total": REQUESTS}
    assert [r["output_tokens"] for r in ok] == [64] * REQUESTS
    assert all(json.loads(r["request_args"])["body"]["ignore_eos"] for r in ok)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("diffuserve:request_success_total", finished_reason="length") == REQUESTS
    assert delta("diffuserve:request_success_total") == REQUESTS
    assert delta("diffuserve:generation_tokens_total") == sum(r["output_tokens"] for r in ok) == 64 * REQUESTS
    assert delta("diffuserve:prompt_tokens_total") == sum(r["prompt_tokens"] for r in ok)
    assert delta("diffuserve:request_generation_tokens_count") == REQUESTS
