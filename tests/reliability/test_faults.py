"""B.4 #13 fault injection over the FakeRunner: a fault in one request's forward fails only that request (500, or
an SSE error event then [DONE]); a fatal fault (the device is gone) fails everything in flight, turns /health 503,
refuses new work, and the watchdog stops the server (tests/reliability/test_process.py: the process exits 1)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from diffuserve.server.lifecycle import Lifecycle, Stage

from .conftest import SCRIPT_TEXT, fake_server, tiny_text
from .ledger import figure


@pytest.fixture(scope="module")
def faulty():
    fault = tiny_text().encode("XYZZY")[0]
    with fake_server(fault_token=fault, fault_after=12) as s:
        yield s


def test_a_runner_fault_fails_only_its_request(faulty):
    base, pool = faulty.base, faulty.pool
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
    assert streamed and (SCRIPT_TEXT * 8).startswith(streamed)
    assert err["error"]["type"] == "server_error" and "injected fault" in err["error"]["message"]
    for i in range(3):
        ok = results[f"ok{i}"]
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(" the king is dead")
    deadline = time.monotonic() + 120
    while pool.pages_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.pages_in_use == 0
    figure("fault_injection", faults_injected=2, requests_survived=3, requests_failed=2, unexpected_fail=0)



def test_a_fatal_fault_stops_the_engine_and_the_watchdog_the_server():
    fatal = tiny_text().encode("PLUGH")[0]
    with fake_server(delay=0.02) as s:
        s.runner.fatal_token = fatal
        life, stopped = Lifecycle(), threading.Event()
        life.engine = s.engine
        life.to(Stage.READY)
        life.watch(stopped.set, grace_s=0.5, every_s=0.05)
        results = {}

        def send(name, prompt):
            results[name] = httpx.post(s.base + "/v1/completions", json={"prompt": prompt, "max_tokens": 40},
                                       timeout=30)

        threads = [threading.Thread(target=send, args=(f"ok{i}", "ROMEO.\n")) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        send("fatal", "PLUGH")
        for t in threads:
            t.join()
        assert all(r.status_code == 500 and "engine stopped" in r.json()["error"]["message"] for r in results.values())
        assert not s.engine.alive and httpx.get(s.base + "/health").status_code == 503
        late = httpx.post(s.base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 4})
        assert late.status_code == 503 and late.headers.get("retry-after")
        assert stopped.wait(5) and life.stage is Stage.DEAD
        assert s.pool.pages_in_use == 0
    figure("fatal_fault", requests_failed=len(results), health=503, watchdog_stopped=1, kv_pages_left=0)
