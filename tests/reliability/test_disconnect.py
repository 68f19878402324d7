"""RELIABILITY.md B.4 #9 (client disconnect, N = 200) with #18's abort counter check.

Raw sockets send a request and close the connection at one of three points, streaming and not:
 - queued: every running slot is held by a blocker stream, the request waits in the queue, the client leaves;
 - first step: the client leaves as soon as its request is admitted (while its first engine step runs);
 - mid-stream: a stream after two SSE events; a plain request ten engine steps into its generation.
The blockers themselves leave mid-stream. Each request has a unique token-id prompt, so the scheduler's `retire`
(wrapped here, nothing else changed) says when and how each one ended and at which engine step its pages were freed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from .conftest import fake_server, metric, scrape
from .ledger import Ledger, figure

N = 200
RUNNING = 8  # engine.max_running: the blockers of the queued point
GEN = 256  # tokens per request; the fake script has no EOS before it, so none finishes within the test
OUTCOMES = ("finished", "aborted", "rejected", "error")


@pytest.fixture(scope="module")
def stack():
    with fake_server(delay=0.01, length=GEN + 50, engine__max_running=RUNNING, engine__max_waiting=256) as s:
        yield s


class Tracker:
    """Wraps the scheduler's retire (the one place pages are freed): prompt -> (engine step, phase, time)."""

    def __init__(self, stack):
        self.stack, self.retired = stack, {}
        sched, engine = stack.scheduler, stack.engine
        orig = sched.retire

        def retire(req):
            self.retired.setdefault(tuple(req.prompt_ids), []).append((engine.steps, req.phase.value,
                                                                       time.monotonic()))
            orig(req)

        sched.retire = retire

    def where(self, prompt: tuple) -> str | None:
        with self.stack.engine.lock:
            if any(tuple(r.prompt_ids) == prompt for r in self.stack.scheduler.running):
                return "running"
            if any(tuple(r.prompt_ids) == prompt for r in self.stack.scheduler.waiting):
                return "waiting"
        return "retired" if prompt in self.retired else None

    def close(self):
        self.stack.scheduler.__dict__.pop("retire", None)  # the class's own retire again


class Client:
    """One raw HTTP/1.1 request on its own connection, closed by the test at the chosen point."""

    def __init__(self, stack, k: int, stream: bool, point: str):
        self.stack, self.k, self.stream, self.point = stack, k, stream, point
        self.prompt = (5, 1000 + k)
        self.closed_at_step: int | None = None
        self.closed_at: float | None = None
        self.received = b""

    async def open(self) -> None:
        host, port = self.stack.base.removeprefix("http://").split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": "tiny-text", "prompt": list(self.prompt), "max_tokens": GEN,
                           "temperature": 0, "stream": self.stream}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()

    async def read_events(self, n: int, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while self.received.count(b"data: ") < n:
            assert time.monotonic() < end, (self.k, self.received[:300])
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout=end - time.monotonic())
            assert chunk, (self.k, "the server closed the stream", self.received[:300])
            self.received += chunk
        assert self.received.startswith(b"HTTP/1.1 200"), self.received[:300]

    def leave(self, rst: bool) -> None:
        self.closed_at_step, self.closed_at = self.stack.engine.steps, time.monotonic()
        if rst:
            self.writer.transport.abort()
        else:
            self.writer.close()


async def until(cond, timeout: float = 20, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def scenario(stack, tracker: Tracker, ledger: Ledger) -> list[Client]:
    rng = random.Random(9)
    clients: list[Client] = []
    k = 0

    def new(stream: bool, point: str) -> Client:
        nonlocal k
        c = Client(stack, k, stream, point)
        k += 1
        clients.append(c)
        ledger.send()
        return c

    def gone(cs):
        return all(tracker.where(c.prompt) == "retired" for c in cs)

    # queued: 4 rounds of 8 blocker streams (they leave mid-stream) + 17 queued requests
    for _ in range(4):
        blockers = [new(True, "mid-stream") for _ in range(RUNNING)]
        for b in blockers:
            await b.open()
        await asyncio.gather(*(b.read_events(1) for b in blockers))
        queued = [new(rng.random() < 0.5, "queued") for _ in range(17)]
        for q in queued:
            await q.open()
        await until(lambda qs=queued: all(tracker.where(q.prompt) == "waiting" for q in qs), what="queued requests")
        for q in queued:
            q.leave(rst=rng.random() < 0.5)
        await until(lambda qs=queued: gone(qs), what="queued requests to be retired")
        assert all(tracker.where(b.prompt) == "running" for b in blockers)  # they held the slots throughout
        await asyncio.gather(*(b.read_events(2) for b in blockers))
        for b in blockers:
            b.leave(rst=rng.random() < 0.5)
        await until(lambda bs=blockers: gone(bs), what="blockers to be retired")

    sem = asyncio.Semaphore(RUNNING)

    async def one(stream: bool, point: str):
        async with sem:
            c = new(stream, point)
            await c.open()
            await until(lambda: tracker.where(c.prompt) in ("running", "retired"), what="admission")
            if point == "first-step":
                pass  # leave at once: its first engine step is under way
            elif stream:
                await c.read_events(2)
            else:
                admitted = stack.engine.steps
                await until(lambda: stack.engine.steps >= admitted + 10, what="ten steps")
            c.leave(rst=rng.random() < 0.5)
            await until(lambda: gone([c]), what="the request to be retired")

    await asyncio.gather(*(one(i % 2 == 0, "first-step") for i in range(50)))
    await asyncio.gather(*(one(i % 2 == 0, "mid-stream") for i in range(50)))
    for c in clients:
        ledger.record(None)  # every client left on its own
    return clients


def test_200_disconnects(stack):
    assert stack.wait_idle(10)
    kv_before, pages_before = stack.pool.bytes_in_use, stack.pool.pages_in_use
    before = {o: metric(scrape(stack.base), "diffuserve:requests_total", outcome=o) for o in OUTCOMES}
    tracker, ledger = Tracker(stack), Ledger()
    t0 = time.monotonic()
    try:
        clients = asyncio.run(scenario(stack, tracker, ledger))
        assert stack.wait_idle(15)
    finally:
        tracker.close()
    wall = time.monotonic() - t0
    after = {o: metric(scrape(stack.base), "diffuserve:requests_total", outcome=o) for o in OUTCOMES}
    delta = {o: after[o] - before[o] for o in OUTCOMES}

    assert len(clients) == N and len({c.prompt for c in clients}) == N
    points = {p: sum(c.point == p for c in clients) for p in ("queued", "first-step", "mid-stream")}
    assert min(points.values()) >= 50 and {c.stream for c in clients} == {True, False}, points
    ledger.check()
    assert ledger.client_aborted == N

    # every request was retired exactly once, and ended aborted (none finished: GEN steps are far off)
    ends = {c.prompt: tracker.retired.get(c.prompt, []) for c in clients}
    assert all(len(e) == 1 for e in ends.values()), {p: e for p, e in ends.items() if len(e) != 1}
    phases = [e[0][1] for e in ends.values()]
    not_finished = sum(p != "finished" for p in phases)
    aborted_seen = sum(p == "aborted" for p in phases)
    # free latency: engine steps (and seconds) from the client's close to its request's pages being freed
    lat_steps = sorted(ends[c.prompt][0][0] - c.closed_at_step for c in clients)
    lat_s = sorted(ends[c.prompt][0][2] - c.closed_at for c in clients)
    p99 = lat_steps[int(0.99 * (len(lat_steps) - 1))]
    for kind in ("stream", "plain"):  # the breakdown, for the log
        for point in ("queued", "first-step", "mid-stream"):
            xs = sorted(ends[c.prompt][0][0] - c.closed_at_step for c in clients
                        if c.point == point and c.stream == (kind == "stream"))
            if xs:
                print(f"  free latency steps {kind:6s} {point:10s} n={len(xs):3d} min={xs[0]} "
                      f"p50={xs[len(xs) // 2]} max={xs[-1]}")

    leaked = stack.pool.pages_in_use + len(stack.scheduler.running) + len(stack.scheduler.waiting)
    kv_delta = stack.pool.bytes_in_use - kv_before
    figure("disconnect", disconnects=N, leaked_slots=leaked, kv_bytes_delta=kv_delta, free_latency_p99_steps=p99,
           aborted_metric_delta=int(delta["aborted"]), free_latency_max_s=f"{lat_s[-1]:.2f}",
           wall_s=f"{wall:.1f}", **{f"at_{p.replace('-', '_')}": n for p, n in points.items()})
    assert stack.scheduler.leaks() is None and leaked == 0 and pages_before == 0
    assert kv_delta == 0
    assert phases.count("finished") == 0 and delta["finished"] == 0, phases
    assert aborted_seen == not_finished == N
    assert delta["aborted"] == not_finished  # #18: the abort counter moved by exactly the aborted requests
    assert delta["error"] == 0 and delta["rejected"] == 0, delta
    assert min(lat_steps) >= 0
    # a request is freed at the step boundary after the server notices the close (routes poll every 0.5 s)
    assert lat_s[-1] < 2.0, lat_s[-5:]
