"""B.4 #6 auth: exactly the /v1/ and tokenizer routes need a key (any of the configured ones, `Bearer` in any case); probes,
metrics and docs stay open; keys are compared as fixed-length digests with hmac.compare_digest, every key each time;
CORS preflight is answered (without a key) only for configured origins."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest

import diffuserve.server.errors as errors

from .conftest import fake_server
from .ledger import figure

KEYS = ("key-one-0123456789", "key-two-abcdefghij")
PROTECTED = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny-text", None),
             ("POST", "/v1/completions", {"prompt": "ROMEO.\n", "max_tokens": 4}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
             ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
             ("GET", "/tokenizer_info", None)]
PUBLIC = ["/health", "/ready", "/metrics", "/openapi.json", "/docs", "/playground"]


@pytest.fixture(scope="module")
def keyed():
    with fake_server(server__api_key=",".join(KEYS), server__cors_origins=("https://app.example",)) as s:
        yield s


def call(base, method, path, body, auth):
    headers = {"authorization": auth} if auth is not None else {}
    return httpx.request(method, base + path, json=body, headers=headers, timeout=30)


def test_exactly_the_api_routes_need_a_key(keyed):
    base, unauthorized = keyed.base, 0
    for method, path, body in PROTECTED:
        for auth in (None, "", "Bearer", "Bearer wrong", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x", KEYS[0]):
            r = call(base, method, path, body, auth)
            assert r.status_code == 401, (path, auth, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            unauthorized += 1
        for auth in (f"Bearer {KEYS[0]}", f"bearer {KEYS[1]}", f"BEARER {KEYS[1]}"):
            r = call(base, method, path, body, auth)
            assert r.status_code == 200, (path, auth, r.text)
    for path in PUBLIC:
        assert httpx.get(base + path).status_code == 200, path
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEYS[1])
    assert client.completions.create(model="tiny-text", prompt="ROMEO.\n", max_tokens=4).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope").models.list()
    figure("auth", routes_checked=len(PROTECTED) + len(PUBLIC), **{"401_count": unauthorized},
           public_routes=len(PUBLIC))


def test_cors_preflight_only_for_configured_origins(keyed):
    pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    ok = httpx.options(keyed.base + "/v1/completions", headers={"origin": "https://app.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(keyed.base + "/v1/completions", headers={"origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in other.headers


def test_keys_are_compared_as_digests_in_constant_time(monkeypatch):
    from diffuserve.engine.config import build_config

    calls = []
    real = errors.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(errors.hmac, "compare_digest", spy)
    guard = errors.Guard(None, build_config(None, model__path="tiny-text", server__api_key=",".join(KEYS)))
    assert guard.authorized(f"Bearer {KEYS[0]}") and not guard.authorized("Bearer " + "x" * 5000)
    assert len(calls) == 2 * len(KEYS)  # every key, every time, even after a match
    assert all(len(a) == len(b) == 32 for a, b in calls)  # sha256 digests: the key's length leaks nothing
    assert calls[0][1] == hashlib.sha256(KEYS[0].encode()).digest()
