"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) with its shapes, x-request-id on every
response, and /v1/models answering while the model still loads. Real server on the bundled tiny-text."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest

from conftest import FIXTURES, running_server

ROOT = FIXTURES.parents[1]


@pytest.fixture(scope="module")
def base():
    with running_server() as url:
        yield url


def test_tokenize_detokenize_round_trip_in_vllms_shapes(base):
    from diffuserve.engine.llm import LLM

    tok = LLM(str(ROOT / "models/tiny-text"), "float32").tokenizer
    text = "ROMEO.\nWhat light through yonder window breaks?"
    r = httpx.post(base + "/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == tok(text)["input_ids"] and body["count"] == len(body["tokens"]) > 5
    assert body["max_model_len"] == httpx.get(base + "/v1/models").json()["data"][0]["max_model_len"]
    assert len(body["token_strs"]) == body["count"] and "".join(body["token_strs"]).replace(" ", "") != ""
    assert httpx.post(base + "/tokenize", json={"prompt": text}).json()["token_strs"] is None
    back = httpx.post(base + "/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": tok.decode(body["tokens"])}
    # Chat messages are rendered with the model's template, as /v1/chat/completions would.
    msgs = [{"role": "user", "content": "To be, or not to be"}]
    chat = httpx.post(base + "/tokenize", json={"messages": msgs}).json()
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    bare = httpx.post(base + "/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"]
    # Bad input: OpenAI-style 400s, an unknown model a 404.
    for bad in ({}, {"prompt": "a", "messages": msgs}, {"prompt": 3}):
        r = httpx.post(base + "/tokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
    r = httpx.post(base + "/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(base + "/tokenize", json={"prompt": "a", "model": "nope"}).status_code == 404


def test_tokenizer_info_gives_what_a_remote_tokenizer_needs(base):
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["model_max_length"] > 0 and info["tokenizer_class"] and info["chat_template"]
    # lm-eval's remote tokenizer encodes the eos string and takes the first id: it must be the model's EOS id.
    eos = info["eos_token"]
    assert eos is not None
    ids = httpx.post(base + "/tokenize", json={"prompt": eos, "add_special_tokens": False}).json()["tokens"]
    from diffuserve.engine.model import load_spec

    assert ids == [load_spec(str(ROOT / "models/tiny-text")).eos_id]


def test_every_response_carries_a_request_id(base):
    r = httpx.get(base + "/v1/models", headers={"x-request-id": "client-chosen-42"})
    assert r.headers["x-request-id"] == "client-chosen-42"
    ids = {httpx.get(base + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    bad = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": -1},
                     headers={"x-request-id": "x" * 500})  # too long to echo: a fresh one instead
    assert bad.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 8, "stream": True},
                      headers={"x-request-id": "stream-1"}) as s:
        assert s.headers["x-request-id"] == "stream-1" and list(s.iter_lines())


def test_models_answers_while_the_model_loads():
    """/v1/models names the model from the first second (before /ready), behind the API key like afterwards."""
    with _spawn("--api-key", "k1") as (proc, base):
        seen = []
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                ready = httpx.get(base + "/ready", timeout=5)
                models = httpx.get(base + "/v1/models", headers={"authorization": "Bearer k1"}, timeout=5)
                anon = httpx.get(base + "/v1/models", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            seen.append((ready.status_code, models.status_code, anon.status_code))
            assert models.status_code == 200 and anon.status_code == 401, seen
            assert models.json()["data"][0]["id"] == "tiny-text" and models.json()["data"][0]["max_model_len"] > 0
            if ready.status_code == 200:
                break
        assert seen[0][0] == 503 and seen[-1][0] == 200, seen  # answered while loading, then ready


class _spawn:
    """A `diffuserve serve` process polled from its first second (running_server waits for /ready)."""

    def __init__(self, *args: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args = args

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "diffuserve.tools.cli", "serve", *self.args, "--port",
                                      str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        return self.proc, f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
