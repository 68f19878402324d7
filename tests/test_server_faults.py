"""The real app and engine loop over a FakeRunner, served by uvicorn in this process: an injected runner fault
ends only its own request (500, or an SSE error event then [DONE]), and chunked bodies over the limit get 413."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from engine.config import build_config
from engine.engine import AsyncEngine, Engine
from engine.fake_runner import FakeModel, FakeRunner
from engine.llm import LLM
from engine.metrics import Metrics
from engine.model.kv_pool import KVPool
from engine.scheduler import Limits, Scheduler
from server.routes import create_app


@pytest.fixture(scope="module")
def server():
    llm = LLM("tiny-text")  # its tokenizer and limits; every forward is the fake runner's
    fault = llm.encode("XYZZY")[0]
    words = llm.encode(" the king is dead and long live the queen")

    def script(prompt):
        return (words * 8)[:40]

    runner = FakeRunner(llm.spec, script, delay=0.005, fault_token=fault, fault_after=12)
    pool = KVPool(1, 1, 1, 400, 16, llm.model.dtype)
    engine = Engine(FakeModel(llm.spec), Scheduler(Limits(), pool), runner)
    engine.start()
    cfg = build_config(None, model__path="tiny-text", server__max_body_bytes=4096)
    metrics = Metrics("tiny-text")
    app = create_app(cfg, llm, AsyncEngine(engine), metrics, ready=lambda: True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", pool, engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def test_a_runner_fault_fails_only_its_request(server):
    base, pool, _ = server
    results = {}

    def plain(name, prompt):
        results[name] = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 48}, timeout=60)

    def streamed():
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"prompt": "XYZZY and more", "max_tokens": 48, "stream": True}) as r:
            results["stream_status"] = r.status_code
            results["stream"] = [ln for ln in r.iter_lines() if ln]

    threads = [threading.Thread(target=plain, args=(f"ok{i}", "ROMEO.\n")) for i in range(3)]
    threads += [threading.Thread(target=plain, args=("bad", "XYZZY ROMEO")), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = results["bad"]
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert "injected fault" in bad.json()["error"]["message"]
    events = results["stream"]
    assert results["stream_status"] == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])
    streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2])
    # text streamed first (a prefix of the script), then the error, then [DONE]
    assert streamed and (" the king is dead and long live the queen" * 8).startswith(streamed)
    assert err["error"]["type"] == "server_error" and "injected fault" in err["error"]["message"]
    for i in range(3):
        ok = results[f"ok{i}"]
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(" the king is dead")
    deadline = time.monotonic() + 10
    while pool.pages_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.pages_in_use == 0
    print("FIGURE faults_injected=2 requests_survived=3 requests_failed=2 unexpected_fail=0")


def test_chunked_body_over_the_limit_is_refused(server):
    base, _, _ = server

    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = httpx.post(base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 8})
    assert small.status_code == 200


def test_health_turns_503_once_the_engine_thread_is_gone(server):
    base, _, engine = server  # the module's last test: it stops the engine
    assert httpx.get(base + "/health").status_code == 200
    engine.stop()
    r = httpx.get(base + "/health")
    assert r.status_code == 503 and r.json()["status"] == "engine stopped"
