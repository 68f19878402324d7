"""A long soak (marker `soak`, not in the default run): steady mixed load on the fake runner for
DIFFUSERVE_SOAK_S seconds (default 600), then the resource baseline of RELIABILITY.md B.4: no request or KV page
held, thread and file-descriptor counts back to where they started, RSS drift bounded. Run it with

    .venv/bin/python -m pytest -q -m soak tests/reliability/test_soak.py
"""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest

from .conftest import fake_server
from .ledger import Ledger, figure, rss_mb


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.soak
def test_soak_holds_nothing_afterwards():
    duration = float(os.environ.get("DIFFUSERVE_SOAK_S", "600"))
    with fake_server(delay=0.01, engine__max_running=8, engine__max_waiting=8) as s:
        with httpx.Client() as warm:  # the first requests allocate what stays (pools, caches): measure after them
            for _ in range(20):
                warm.post(s.base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 16})
        assert s.wait_idle()
        base_fds, base_threads, base_rss = fds(), threading.active_count(), rss_mb()
        ledger, stop = Ledger(expected_statuses=frozenset({400})), time.monotonic() + duration

        def client(seed: int):
            rng = random.Random(seed)
            with httpx.Client(timeout=30) as c:
                while time.monotonic() < stop:
                    body = {"prompt": "ROMEO.\n", "max_tokens": rng.choice([8, 32, 64]),
                            "stream": rng.random() < 0.5}
                    if rng.random() < 0.05:
                        body["temperature"] = -1  # an intended 400
                    ledger.send()
                    try:
                        if body["stream"] and rng.random() < 0.2:  # leave mid-stream
                            with c.stream("POST", s.base + "/v1/completions", json=body) as r:
                                next(r.iter_lines(), None)
                            ledger.record(None)
                            continue
                        r = c.post(s.base + "/v1/completions", json=body)
                        ledger.record(r.status_code, r.headers.get("retry-after"), r.text)
                    except httpx.HTTPError as exc:
                        ledger.record(-1, detail=repr(exc))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.wait_idle(30)
        time.sleep(s.cfg.server.keep_alive_s + 1)  # idle keep-alive connections close
        ledger.check()
        drift = rss_mb() - base_rss
        assert fds() <= base_fds + 2 and threading.active_count() <= base_threads
        assert drift < 50, drift
        figure("soak", duration_s=round(duration), **ledger.counts(), rss_drift_mb=round(drift, 1),
               fd_delta=fds() - base_fds, thread_delta=threading.active_count() - base_threads)
