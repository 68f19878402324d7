"""The `diffuserve` command as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import PARITY

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffuserve.tools.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=check)


def test_help():
    out = _run("--help", check=True).stdout
    for sub in ("generate", "conformance", "serve"):
        assert sub in out


def test_generate_json_reports_ids_and_forward_passes():
    out = _run("generate", "--model", str(PARITY / "llada-tiny" / "model"), "--prompt-ids",
               "126080,1000,1001,1002,5", "--gen-length", "16", "--steps", "8", "--json", check=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    assert data["method"] == "llada" and data["forward_passes"] == 8 and len(data["ids"]) == 16
    assert data["wall_time_s"] > 0


def test_generate_rejects_bad_options_cleanly():
    res = _run("generate", "--model", str(PARITY / "llada-tiny" / "model"), "--prompt-ids", "1,2",
               "--gen-length", "10", "--block-length", "3")
    assert res.returncode == 2 and "multiple of block_length" in res.stderr
    # a flag the method does not read is named, not silently ignored
    res = _run("generate", "--model", str(PARITY / "llada-tiny" / "model"), "--prompt-ids", "1,2",
               "--gen-length", "8", "--threshold", "0.9")
    assert res.returncode == 2 and "method 'llada' has no option 'threshold'" in res.stderr


def test_conformance_command_output_and_exit_codes(tmp_path):
    cases = PARITY / "llada-tiny" / "cases.json"
    res = _run("conformance", str(cases), "--methods", "fast_dllm_dual")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "8 passed, 0 failed"
    # A tampered expectation fails, names the case and its first differing position, and exits 1; a case of an
    # unknown method is skipped. The model path is resolved relative to the cases file.
    data = json.loads(cases.read_text())
    keep = [c for c in data["cases"] if c["method"] == "fast_dllm_dual"][:2]
    keep[1] = dict(keep[1], output_ids=[[keep[1]["output_ids"][0][0]] + [7] + keep[1]["output_ids"][0][2:]])
    keep.append(dict(keep[0], id="future-case", method="not_built_yet"))
    model_link = tmp_path / "m"
    model_link.symlink_to(PARITY / "llada-tiny" / "model")
    (tmp_path / "cases.json").write_text(json.dumps(dict(data, model="m", cases=keep)))
    res = _run("conformance", str(tmp_path / "cases.json"))
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"
    assert any(keep[1]["id"] in l and "position 1" in l for l in lines)
    assert any("future-case" in l and "skipped: method not implemented" in l for l in lines)


def test_version_and_serve_help_lists_every_config_field_with_its_default():
    import dataclasses
    from importlib.metadata import version

    from diffuserve.engine.config import EngineConfig, ModelConfig, ServerConfig

    assert _run("--version", check=True).stdout.strip() == f"diffuserve {version('diffuserve')}"
    text = " ".join(_run("serve", "--help", check=True).stdout.split())  # argparse wraps lines
    for cls in (ModelConfig, ServerConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            if f.name == "path":
                continue  # the positional `model`
            flag = "--" + f.name.replace("_", "-")
            found = re.compile(re.escape(flag) + r"[ ,]").search(text, text.index("options:"))  # not the usage
            assert found, flag
            entry = text[found.start():text.find(" --", found.end() + 8)]
            assert "(default: " in entry, entry
    for flag in ("--max-num-seqs", "--max-num-batched-tokens", "--method", "--option", "--method-option", "model"):
        assert flag in text, flag
    assert "(default: 64)" in text and "(default: '127.0.0.1')" in text and "--docs, --no-docs" in text


def test_serve_flags_reach_the_config(monkeypatch):
    from diffuserve.engine.config import build_config
    from diffuserve.tools.cli import build_parser
    from diffuserve.tools.serve_flags import config_overrides

    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args([
        "serve", "tiny-task", "--max-num-seqs", "3", "--max-waiting", "0", "--no-docs", "--cors-origins", "a,b",
        "--request-timeout-s", "9.5", "--metrics-prefix", "vllm", "--option", "threshold=0.8",
        "--method-option", "guided.verifier=tiny-task-ar", "--method-option", "llada.steps=16"])
    cfg = build_config(args.config, **config_overrides(args))
    assert (cfg.engine.max_running, cfg.engine.max_waiting, cfg.engine.request_timeout_s) == (3, 0, 9.5)
    assert cfg.server.docs is False and cfg.server.cors_origins == ("a", "b") and cfg.server.metrics_prefix == "vllm"
    assert cfg.model.path.endswith("tiny-task") and cfg.decoding.options["threshold"] == 0.8
    # The bundled model's own options (configs/tiny-task.yaml) stay where a flag does not set them.
    assert cfg.decoding.options["span"] == 48
    assert cfg.decoding.methods["guided"]["verifier"] == "tiny-task-ar" and cfg.decoding.methods["llada"]["steps"] == 16
    bad = _run("serve", "--option", "threshold")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    bad = _run("serve", "--metrics-prefix", "9x")
    assert bad.returncode == 2 and "metrics_prefix" in bad.stderr
