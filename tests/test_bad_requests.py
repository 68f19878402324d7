"""Table-driven bad requests (RELIABILITY.md B.4 test 1): each gets its documented status and an OpenAI error object,
none a 5xx, and the server answers a good request afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import running_server

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 8}
MSG = {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def body(base: dict, **changes) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()
J = "application/json"

# (name, path, JSON body or raw bytes, content type, status, param that must be named or None)
CASES = [
    ("missing prompt", C, body(OK, prompt=DROP), J, 400, "prompt"),
    ("prompt is a number", C, body(OK, prompt=5), J, 400, None),
    ("empty prompt", C, body(OK, prompt=""), J, 400, "prompt"),
    ("empty prompt list", C, body(OK, prompt=[]), J, 400, "prompt"),
    ("empty token list", C, body(OK, prompt=[[]]), J, 400, "prompt"),
    ("negative token id", C, body(OK, prompt=[1, -1]), J, 400, "prompt"),
    ("token id beyond vocab", C, body(OK, prompt=[1, 10**6]), J, 400, "prompt"),
    ("mixed prompt list", C, body(OK, prompt=[1, "a"]), J, 400, None),
    ("too many prompts", C, body(OK, prompt=["a"] * 100), J, 400, "prompt"),
    ("max_tokens 0", C, body(OK, max_tokens=0), J, 400, "max_tokens"),
    ("max_tokens negative", C, body(OK, max_tokens=-5), J, 400, "max_tokens"),
    ("max_tokens huge", C, body(OK, max_tokens=10**12), J, 400, "max_tokens"),
    ("max_tokens a string", C, body(OK, max_tokens="ten"), J, 400, "max_tokens"),
    ("max_tokens fractional", C, body(OK, max_tokens=1.5), J, 400, "max_tokens"),
    ("prompt + max_tokens over context", C, body(OK, max_tokens=1020), J, 400, "max_tokens"),
    ("n 0", C, body(OK, n=0), J, 400, "n"),
    ("n over the cap", C, body(OK, n=1000), J, 400, "n"),
    ("n a million", C, body(OK, n=10**6), J, 400, "n"),
    ("temperature negative", C, body(OK, temperature=-1), J, 400, "temperature"),
    ("temperature 3", C, body(OK, temperature=3), J, 400, "temperature"),
    ("temperature NaN", C, b'{"prompt": "a", "temperature": NaN}', J, 400, "temperature"),
    ("temperature Infinity", C, b'{"prompt": "a", "temperature": Infinity}', J, 400, "temperature"),
    ("top_p 0", C, body(OK, top_p=0), J, 400, "top_p"),
    ("top_p 1.5", C, body(OK, top_p=1.5), J, 400, "top_p"),
    ("five stop strings", C, body(OK, stop=["a", "b", "c", "d", "e"]), J, 400, "stop"),
    ("empty stop string", C, body(OK, stop=[""]), J, 400, "stop"),
    ("stop a number", C, body(OK, stop=123), J, 400, None),
    ("negative seed", C, body(OK, seed=-1), J, 400, "seed"),
    ("5000-digit integer", C, b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", J, 400, None),
    ("unknown model", C, body(OK, model="gpt-5"), J, 404, "model"),
    ("invalid JSON", C, b'{"prompt": "a",', J, 400, None),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe"}', J, 400, None),
    ("10k-deep nesting", C, b"[" * 10_000 + b"]" * 10_000, J, 400, None),
    ("wrong content type", C, json.dumps(OK).encode(), "text/plain", 415, None),
    ("body is an array", C, b"[1, 2]", J, 400, None),
    ("body is a string", C, b'"hello"', J, 400, None),
    ("empty body", C, b"", J, 400, None),
    ("raw NUL byte", C, b'{"prompt": "a"\x00}', J, 400, None),
    ("unknown method", C, body(OK, method="telepathy"), J, 400, "method"),
    ("method of another family", C, body(OK, method="dream"), J, 400, "method"),
    ("steps 0", C, body(OK, steps=0), J, 400, "steps"),
    ("steps over max_tokens", C, body(OK, steps=64), J, 400, "steps"),
    ("threshold 2", C, body(OK, threshold=2), J, 400, "threshold"),
    ("block_length with the window method", C, body(OK, block_length=4), J, 400, "block_length"),
    ("remasking with the window method", C, body(OK, remasking="random"), J, 400, "remasking"),
    ("alg with a LLaDA-family method", C, body(OK, method="llada", alg="entropy"), J, 400, "alg"),
    ("steps with guided (no step budget)", C, body(OK, method="guided", steps=4), J, 400, "steps"),
    ("top_p below 1 with a method without nucleus sampling", C, body(OK, top_p=0.5), J, 400, "top_p"),
    ("refresh policy unknown", C, body(OK, refresh="sometimes"), J, 400, "refresh"),
    ("logit_bias", C, body(OK, logit_bias={"5": 10}), J, 400, "logit_bias"),
    ("best_of 3", C, body(OK, best_of=3), J, 400, "best_of"),
    ("suffix", C, body(OK, suffix="the end"), J, 400, "suffix"),
    ("logprobs 21", C, body(OK, logprobs=21), J, 400, "logprobs"),
    ("logprobs with a whole-run method", C, body(OK, logprobs=1, method="llada"), J, 400, "logprobs"),
    ("chat without messages", CHAT, body(MSG, messages=DROP), J, 400, "messages"),
    ("chat with no message", CHAT, body(MSG, messages=[]), J, 400, "messages"),
    ("chat role unknown", CHAT, body(MSG, messages=[{"role": "wizard", "content": "x"}]), J, 400, None),
    ("chat content a number", CHAT, body(MSG, messages=[{"role": "user", "content": 5}]), J, 400, None),
    ("chat top_logprobs = vocab", CHAT, body(MSG, logprobs=True, top_logprobs=4096), J, 400, "top_logprobs"),
    ("chat tools", CHAT, body(MSG, tools=[{"type": "function", "function": {"name": "f"}}]), J, 400, "tools"),
    ("chat json response_format", CHAT, body(MSG, response_format={"type": "json_object"}), J, 400,
     "response_format"),
    ("chat max_completion_tokens 0", CHAT, body(MSG, max_completion_tokens=0), J, 400, "max_completion_tokens"),
    ("chat unknown model", CHAT, body(MSG, model="other"), J, 404, "model"),
]


@pytest.fixture(scope="module")
def base():
    with running_server() as url:
        yield url


def test_bad_requests_get_their_documented_errors(base):
    shape_ok, five_xx = 0, 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for name, path, payload, ctype, status, param in CASES:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            r = client.post(path, content=raw, headers={"content-type": ctype})
            five_xx += r.status_code >= 500
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (name, err)
            assert isinstance(err["type"], str)
            if param is not None:
                assert err["param"] == param, (name, err)
            shape_ok += 1
        good = client.post(C, json=OK)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
        no_op = client.post(C, json=body(OK, top_p=1))  # what many OpenAI clients send: nucleus sampling off
        assert no_op.status_code == 200, no_op.text[:300]
    print(f"FIGURE bad_inputs_tried={len(CASES)} shape_ok={shape_ok} 5xx={five_xx} server_alive=1")
    assert len(CASES) >= 40
