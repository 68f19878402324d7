"""ignore_eos and min_tokens (vLLM's fields): no stop token may settle among the first min_tokens generated
positions (all of them with ignore_eos), for every kind of step plan. Real server on the bundled tiny-task, whose
answers end with EOS well inside the canvas."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import running_server
from diffuserve.tools.train import task_data as tk

PROMPT = " ".join(["count", "down", "from", *tk.num(5)])  # the answer (29 tokens), then EOS
METHODS = ["window", "llada", "streaming_llada", "fast_dllm_dual"]


@pytest.fixture(scope="module")
def base():
    with running_server("tiny-task") as url:
        yield url


def chat(base: str, **body) -> dict:
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                        "max_tokens": 64, "temperature": 0, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("method", METHODS)
def test_ignore_eos_gives_exactly_max_tokens(base, method):
    plain = chat(base, method=method)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 64
    forced = chat(base, method=method, ignore_eos=True)
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 64
    low = chat(base, method=method, min_tokens=48)
    assert low["usage"]["completion_tokens"] >= 48


def test_min_tokens_streamed_and_bounds(base):
    with httpx.stream("POST", base + "/v1/completions", timeout=300, json={
            "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
    usage = json.loads(lines[-1][6:])["usage"]
    assert usage["completion_tokens"] == 40
    r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "min_tokens": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "min_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
