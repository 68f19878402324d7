"""`diffuserve serve` as the README starts it: a real uvicorn process on a free loopback port."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest

from conftest import PARITY, running_server


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json",
                                                                  **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server():
    with running_server(str(PARITY / "llada-tiny" / "model"), "--api-key", "sekret",
                        "--served-model-name", "tiny") as base:
        yield base


AUTH = {"authorization": "Bearer sekret"}


def test_completion_with_token_ids(server):
    status, body = _post(server + "/v1/completions", {"model": "tiny", "prompt": [126080, 1000, 1001, 5],
                                                      "max_tokens": 16, "steps": 8}, AUTH)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 4
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_errors_are_openai_shaped(server):
    status, body = _post(server + "/v1/completions", {"prompt": [1, 2]})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = _post(server + "/v1/completions", {"prompt": [1, 2], "max_tokens": 0}, AUTH)
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(server + "/v1/completions", {"model": "other", "prompt": [1, 2]}, AUTH)
    assert status == 404 and body["error"]["param"] == "model"
    status, body = _post(server + "/v1/completions", {"prompt": [1, 2], "max_tokens": 10, "block_length": 3}, AUTH)
    assert status == 400 and "block_length" in body["error"]["message"]
    status, body = _post(server + "/v1/completions", {"prompt": "text needs a tokenizer"}, AUTH)
    assert status == 400 and body["error"]["param"] == "prompt"
    # Over the body limit: refused from the Content-Length header, before any body byte is read.
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in {**AUTH, "content-type": "application/json", "content-length": str(50_000_000)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["message"] == "request body too large"
    conn.close()
    # The server is still healthy after all of that.
    with urllib.request.urlopen(server + "/health", timeout=5) as r:
        assert r.status == 200
