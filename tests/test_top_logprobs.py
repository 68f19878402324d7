"""top_logprobs / logprobs up to 20: each generated token's most likely alternatives, from the distribution at the
step it settled, in chat and completions, streamed and not. Real server on the bundled tiny-text (method window)."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import running_server

PROMPT = {"prompt": "ROMEO.\n", "max_tokens": 24, "temperature": 0, "seed": 3}
CHAT = {"messages": [{"role": "user", "content": "To be, or not to be"}], "max_tokens": 24, "temperature": 0,
        "seed": 3}


@pytest.fixture(scope="module")
def base():
    with running_server() as url:
        yield url


def streamed(base: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200
        return [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]


def test_completions_logprobs_5(base):
    plain = httpx.post(base + "/v1/completions", json=PROMPT, timeout=120).json()
    r = httpx.post(base + "/v1/completions", json={**PROMPT, "logprobs": 5}, timeout=120).json()
    choice = r["choices"][0]
    assert choice["text"] == plain["choices"][0]["text"]  # asking for alternatives changes no token
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == r["usage"]["completion_tokens"] == len(lp["top_logprobs"]) > 0
    for tok, own, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        values = list(top.values())
        # Distinct ids can share a string (then one key), so at most 5; greedy: the token is the first.
        assert 1 <= len(top) <= 5 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert tok in top and own == max(values) == top[tok]
    chunks = streamed(base, "/v1/completions", {**PROMPT, "logprobs": 5})
    tops = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["top_logprobs"]]
    assert tops == lp["top_logprobs"]


def test_chat_top_logprobs_5(base):
    plain = httpx.post(base + "/v1/chat/completions", json=CHAT, timeout=120).json()
    r = httpx.post(base + "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 5}, timeout=120)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == plain["choices"][0]["message"]["content"]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] > 0
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["logprob"] == entry["logprob"] and top[0]["bytes"] == list(top[0]["token"].encode())
    chunks = streamed(base, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 5})
    got = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert got == content
    # logprobs without top_logprobs: no alternatives, as OpenAI.
    bare = httpx.post(base + "/v1/chat/completions", json={**CHAT, "logprobs": True}, timeout=120).json()
    assert all(e["top_logprobs"] == [] for e in bare["choices"][0]["logprobs"]["content"])


def test_top_logprobs_limits(base):
    for path, body, param in (("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
                              ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                              ("/v1/completions", {**PROMPT, "logprobs": 21}, "logprobs")):
        r = httpx.post(base + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(base + "/v1/completions", json={**PROMPT, "logprobs": 20, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and all(len(t) >= 10 for t in r.json()["choices"][0]["logprobs"]["top_logprobs"])
