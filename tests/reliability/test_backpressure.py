"""RELIABILITY.md B.4 #7 (backpressure) and #18 (metrics agree with the client's ledger).

A fake server with max_running = R and max_waiting = Q holds R + Q long requests; K more, sent once those R + Q are
admitted (running or queued), each get a 429 with Retry-After. Then A requests whose clients give up mid-generation
are aborted. /metrics is then compared with what the clients saw.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import fake_server, metric, scrape
from .ledger import Ledger, figure

R, Q, K, A = 3, 4, 5, 2
LONG = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 32, "temperature": 0}  # 32 steps of ~45 ms
ABORT_PROMPT = [5, 6, 7, 8]  # token ids, so the server's prompt-token count for them is known exactly
OUTCOMES = ("finished", "aborted", "rejected", "error")


class Poller:
    """Reads /metrics every few ms on its own thread, keeping the largest queue gauges seen."""

    def __init__(self, base: str):
        self.base, self.waiting_max, self.running_max, self.scrapes = base, 0.0, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = scrape(self.base)
            self.waiting_max = max(self.waiting_max, metric(m, "diffuserve:num_requests_waiting"))
            self.running_max = max(self.running_max, metric(m, "diffuserve:num_requests_running"))
            self.scrapes += 1
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def totals(samples) -> dict:
    out = {o: metric(samples, "diffuserve:requests_total", outcome=o) for o in OUTCOMES}
    for name in ("generation_tokens_total", "prompt_tokens_total", "e2e_request_latency_seconds_count"):
        out[name] = metric(samples, "diffuserve:" + name)
    return out


@pytest.fixture(scope="module")
def run():
    """The load, once for both tests: R + Q held, K rejected, then A clients that give up."""
    with fake_server(delay=0.04, engine__max_running=R, engine__max_waiting=Q) as stack:
        before = totals(scrape(stack.base))
        ledger = Ledger()
        held, extra, lock = [], [], threading.Lock()

        def post(into: list, body: dict, timeout: float = 60):
            ledger.send()
            try:
                r = httpx.post(stack.base + "/v1/completions", json=body, timeout=timeout)
            except httpx.TimeoutException:
                ledger.record(None)
                with lock:
                    into.append(None)
                return
            ledger.record(r.status_code, r.headers.get("retry-after"), r.text)
            with lock:
                into.append(r)

        with Poller(stack.base) as poller:
            # R first, until they run; then Q, until they wait (a burst into an idle server is test_burst_...)
            first = []
            for n, want in ((R, (R, 0)), (Q, (R, Q))):
                wave = [threading.Thread(target=post, args=(held, LONG)) for _ in range(n)]
                for t in wave:
                    t.start()
                first += wave
                end = time.monotonic() + 120
                while stack.scheduler.counts() != want:
                    assert time.monotonic() < end, (stack.scheduler.counts(), want, ledger.counts())
                    time.sleep(0.002)
            counts_when_full = stack.scheduler.counts()
            more = [threading.Thread(target=post, args=(extra, LONG)) for _ in range(K)]
            for t in more:
                t.start()
            for t in more:
                t.join()
            held_done_when_k_returned = len(held)  # the K answers came back while the held ones still ran
            for t in first:
                t.join()
            time.sleep(0.1)  # a last scrape or two after everything ended
        bp_counts = ledger.counts()
        # A clients that leave mid-generation (0.3 s into a ~1.5 s request): the server must abort them.
        quitters: list = []
        qs = [threading.Thread(target=post, args=(quitters, {**LONG, "prompt": ABORT_PROMPT}, 0.3))
              for _ in range(A)]
        for t in qs:
            t.start()
        for t in qs:
            t.join()
        assert stack.wait_idle(15)
        after = totals(scrape(stack.base))
        yield {"stack": stack, "ledger": ledger, "bp_counts": bp_counts, "held": held, "extra": extra,
               "quitters": quitters, "poller": poller, "counts_when_full": counts_when_full,
               "held_done_before_k_returned": held_done_when_k_returned,
               "delta": {k: after[k] - before[k] for k in after}}


def test_backpressure(run):
    held, extra, poller, c = run["held"], run["extra"], run["poller"], run["bp_counts"]
    assert run["counts_when_full"] == (R, Q)
    assert run["held_done_before_k_returned"] == 0  # the K were refused while all R + Q were still in flight
    assert len(held) == R + Q and len(extra) == K
    assert [r.status_code for r in held] == [200] * (R + Q), [r.text[:200] for r in held]
    for r in held:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 32, r.json()
    assert [r.status_code for r in extra] == [429] * K, [r.text[:200] for r in extra]
    for r in extra:
        assert r.headers.get("retry-after", "").isdigit() and int(r.headers["retry-after"]) >= 1, r.headers
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "rate_limit_error", err
    assert c["sent"] == R + Q + K and c["ok"] == R + Q and c["rejected"] == K and c["lost"] == 0, c
    assert c["unexpected_fail"] == 0 and c["client_aborted"] == 0, c
    assert poller.scrapes >= 5 and poller.running_max == R
    assert run["stack"].pool.pages_in_use == 0
    figure("backpressure", held=R + Q, rejected=c["rejected"], sent=c["sent"], ok=c["ok"], lost=c["lost"],
           queue_gauge_max=int(poller.waiting_max))
    assert poller.waiting_max == Q


def test_metrics_vs_ledger(run):
    ledger, d, stack = run["ledger"], run["delta"], run["stack"]
    ledger.check()
    assert run["quitters"] == [None] * A  # each of those clients gave up
    oks = [r for r in run["held"] + run["extra"] if r is not None and r.status_code == 200]
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in oks)
    prompt = sum(r.json()["usage"]["prompt_tokens"] for r in oks) + A * len(ABORT_PROMPT)
    pairs = {  # metric delta -> what the clients counted
        "finished": (d["finished"], ledger.ok),
        "rejected": (d["rejected"], ledger.rejected),
        "aborted": (d["aborted"], ledger.client_aborted),
        "error": (d["error"], ledger.unexpected_fail + ledger.expected_fail),
        "generation_tokens": (d["generation_tokens_total"], tokens),
        "prompt_tokens": (d["prompt_tokens_total"], prompt),
        "e2e_count": (d["e2e_request_latency_seconds_count"], ledger.ok + ledger.client_aborted),
    }
    diff = sum(abs(m - c) for m, c in pairs.values())
    assert ledger.client_aborted == A and ledger.ok == R + Q and tokens == 32 * (R + Q)
    assert stack.pool.pages_in_use == 0 and stack.scheduler.leaks() is None
    figure("metrics_vs_ledger", metric_vs_ledger_diff=int(diff), requests_ok=ledger.ok, rejected=ledger.rejected,
           aborted=ledger.client_aborted, completion_tokens=tokens, prompt_tokens=prompt)
    assert diff == 0, pairs


def test_burst_within_capacity_is_all_admitted(run):
    """R + Q requests released at once at an idle server fit its documented capacity (max_running running plus
    max_waiting queued beyond the running set), so none may get a 429: requests that arrive between two engine
    steps, while running slots are still free, must not count against the waiting queue's limit."""
    stack = run["stack"]
    assert stack.wait_idle(15)
    ledger, statuses, lock = Ledger(), [], threading.Lock()
    gate = threading.Barrier(R + Q)
    body = {**LONG, "max_tokens": 8}

    def post():
        with httpx.Client(base_url=stack.base, timeout=60) as c:
            c.get("/health")  # connect first, so the barrier releases requests, not TCP handshakes
            gate.wait()
            ledger.send()
            r = c.post("/v1/completions", json=body)
        ledger.record(r.status_code, r.headers.get("retry-after"), r.text)
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(R + Q)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.check()
    assert stack.wait_idle(15) and stack.pool.pages_in_use == 0
    figure("backpressure_burst", burst=R + Q, ok=ledger.ok, rejected=ledger.rejected, lost=ledger.lost)
    assert sorted(statuses) == [200] * (R + Q), sorted(statuses)
