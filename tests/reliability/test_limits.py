"""B.4 #4 body and header limits, #8 deadlines and slow clients, #19 CVE regressions: each refused with a 4xx before
it costs memory or time, and the server answers a good request afterwards."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from .conftest import fake_server
from .ledger import figure, rss_mb

LIMIT = 64 << 10  # the body limit these servers run with


@pytest.fixture(scope="module")
def limited():
    with fake_server(server__max_body_bytes=LIMIT, server__head_timeout_s=1.0, server__body_timeout_s=1.0,
                     server__keep_alive_s=1.0, engine__request_timeout_s=1.0, delay=0.02, length=400) as s:
        yield s


def body_of_size(n: int) -> bytes:
    """A valid completion body of exactly n bytes (padded with an unknown field, which is ignored)."""
    head, tail = b'{"max_tokens": 4, "prompt": "ROMEO.", "pad": "', b'"}'
    return head + b"a" * (n - len(head) - len(tail)) + tail


def raw(base: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; -> the server's first response (or what came before it closed)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # it answered and closed while we were still sending
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = [ln.split(b":")[1] for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0]):
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def test_body_and_header_limits(limited):
    base, post = limited.base, limited.base + "/v1/completions"
    rss0 = rss_mb()
    ok = httpx.post(post, content=body_of_size(LIMIT), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    big = httpx.post(post, content=body_of_size(LIMIT + 1), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"

    def chunks(n):  # chunked: no Content-Length, so only counting while it arrives can refuse it
        data = body_of_size(n)
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    assert httpx.post(post, content=chunks(LIMIT), headers={"content-type": "application/json"}).status_code == 200
    chunked = httpx.post(post, content=chunks(LIMIT * 4), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    # A lying Content-Length (small) with a larger body: the server reads only what was declared, so the JSON is
    # cut short (400), and the rest is never parsed as a body.
    body = body_of_size(LIMIT * 2)
    lie = raw(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\nConnection: close\r\n\r\n" + body)
    assert status_of(lie) == 400, lie[:200]
    # A huge declared length is refused before a byte of the body is read.
    t0 = time.monotonic()
    huge = raw(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2147483648\r\n\r\n" + b"a" * 1000)
    assert status_of(huge) == 413 and time.monotonic() - t0 < 1.5
    # Headers: 64 KB in one header, 1 MB in one header, 10k small headers.
    h64 = httpx.get(base + "/v1/models", headers={"x-pad": "a" * (64 << 10)})
    assert h64.status_code == 431 and h64.json()["error"]["code"] == "headers_too_large"
    h1m = raw(base, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (1 << 20) + b"\r\n\r\n")
    assert status_of(h1m) in (400, 431), h1m[:200]
    many = raw(base, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
               + b"\r\n")
    assert status_of(many) in (400, 431), many[:200]
    assert httpx.get(base + "/v1/models").status_code == 200
    delta = rss_mb() - rss0
    assert delta < 200, delta
    figure("body_header_limits", max_accepted_bytes=LIMIT, first_rejected_bytes=LIMIT + 1,
           header_64k=h64.status_code, header_1m=status_of(h1m), headers_10k=status_of(many),
           rss_peak_delta_mb=round(delta, 1))


def test_deadlines_and_slow_clients(limited):
    base = limited.base
    # A request running past its deadline ends with 504 within one engine step of it (request_timeout_s = 1).
    t0 = time.monotonic()
    r = httpx.post(base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 400}, timeout=30)
    overrun_ms = (time.monotonic() - t0 - 1.0) * 1000
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    # Streamed: the stream ends with an error event, then [DONE].
    with httpx.stream("POST", base + "/v1/completions", timeout=30,
                      json={"prompt": "ROMEO.\n", "max_tokens": 400, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["type"] == "timeout_error"
    # Slow-loris: a head sent one byte at a time is cut off at the head deadline (1 s), not held open.
    host, port = base.removeprefix("http://").split(":")
    t0 = time.monotonic()
    closed_at = None
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for b in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
            try:
                s.send(bytes([b]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            s.settimeout(0.2)
            try:
                if s.recv(1) == b"":
                    closed_at = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
            except OSError:
                # The server may close with a reset (unread bytes in its buffer): closed all the same.
                closed_at = time.monotonic() - t0
                break
    assert closed_at is not None and closed_at < 3.0, closed_at
    # A slow body (head complete, body trickling) gets 408 at the body deadline.
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"prompt\": \"")
        reply = b""
        s.settimeout(0.3)
        while time.monotonic() - t0 < 5 and not reply:
            try:
                s.send(b"a")
                reply = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
    body_s = time.monotonic() - t0
    assert status_of(reply) == 408 and body_s < 3.0, (reply[:200], body_s)
    assert httpx.get(base + "/v1/models").status_code == 200
    assert limited.wait_idle()
    figure("deadlines", max_overrun_ms=round(overrun_ms), slowloris_closed_s=round(closed_at, 2),
           slow_body_408_s=round(body_s, 2))


def test_cve_regressions(limited):
    """RELIABILITY.md B.3: each known attack gets a 4xx within a second, with bounded memory."""
    base, post = limited.base, limited.base + "/v1/completions"
    vocab = limited.llm.spec.vocab_size
    cases = {
        "n_1e6": lambda: httpx.post(post, json={"prompt": "a", "n": 10**6}),
        "top_logprobs_vocab": lambda: httpx.post(base + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": vocab}),
        "logprobs_vocab": lambda: httpx.post(post, json={"prompt": "a", "logprobs": vocab}),
        "ids_out_of_range": lambda: httpx.post(post, json={"prompt": [vocab, 999999]}),
        "ids_negative": lambda: httpx.post(post, json={"prompt": [-1]}),
        "chat_template": lambda: httpx.post(base + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "a"}],
            "chat_template": "{% for i in range(99**9) %}{% endfor %}"}),
        "chat_template_kwargs": lambda: httpx.post(base + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"x": 1}}),
        "guided_regex": lambda: httpx.post(post, json={"prompt": "a", "guided_regex": "(a+)+$"}),
        "prompt_embeds": lambda: httpx.post(post, json={"prompt": "a", "prompt_embeds": "UEsDBBQ="}),
        "stop_list_1e4": lambda: httpx.post(post, json={"prompt": "a", "stop": ["x"] * 10000}),
        "choices_beyond_capacity": lambda: httpx.post(post, json={"prompt": ["a"] * 32, "n": 16, "max_tokens": 4}),
        "header_1mb": lambda: httpx.get(base + "/v1/models", headers={"x-pad": "a" * (1 << 20)}),
    }
    rss0, worst_s, statuses = rss_mb(), 0.0, {}
    for name, call in cases.items():
        t0 = time.monotonic()
        try:
            status = call().status_code
        except httpx.HTTPError as exc:  # a server closing an oversized head is a refusal too
            status = f"closed:{type(exc).__name__}"
        worst_s = max(worst_s, time.monotonic() - t0)
        statuses[name] = status
    # A 2^31-character prompt: refused from its Content-Length by the body limit, before any of it is read.
    t0 = time.monotonic()
    reply = raw(base, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n{\"prompt\": \"aaaa" % (2**31 + 16))
    statuses["prompt_2e31_chars"] = status_of(reply)
    worst_s = max(worst_s, time.monotonic() - t0)
    bad = {k: v for k, v in statuses.items() if not (isinstance(v, int) and 400 <= v < 500)
           and not (k == "header_1mb" and str(v).startswith("closed"))}
    assert not bad, bad
    assert worst_s < 1.0, worst_s
    assert httpx.post(post, json={"prompt": "ROMEO.\n", "max_tokens": 4}).status_code == 200
    delta = rss_mb() - rss0
    assert delta < 100, delta
    figure("cve_regressions", cases=len(statuses), max_rss_delta_mb=round(delta, 1), max_latency_s=round(worst_s, 3))
