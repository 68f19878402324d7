"""Engine: the loop that steps every running request in one batched forward, on a dedicated worker thread.

Each step: act on aborts and deadlines, admit waiting requests (`Scheduler.admit`), ask each running request's
decoding state for its plan, pack the plans into one forward (`ModelRunner.step`), hand each request its logits
(`commit`), emit what has settled, and retire the finished, freeing their KV pages right there. Requests join and
leave between steps, so one request's refresh step and others' pruned steps share a forward.

A failure inside the batched forward is retried request by request, so only the request that fails alone fails.
A fatal error (`FatalEngineError`, or a CUDA error: the device is unusable for everyone) instead ends every request
with a 500 and stops the loop; `alive` then turns False, /health 503, and the server's watchdog exits the process
so that its supervisor restarts it. Every method is a stepped state (engine.decoding.step), so a request of any
method shares each step with the others and can be aborted at any step boundary.

`AsyncEngine` is the front the server awaits: `generate()` submits a request and yields its outputs as they come.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from typing import AsyncIterator

import torch

from .request import Request, RequestOutput, RequestStatus
from .runner import ModelRunner, StepStats
from .scheduler import Draining, Scheduler

log = logging.getLogger("diffuserve.engine")
SETTLE_TIMEOUT_S = 0.05  # the longest a step waits for the event loop to take the previous step's outputs


class FatalEngineError(RuntimeError):
    """The model or device can no longer compute anything: the engine stops rather than fail request by request."""


def is_fatal(exc: BaseException) -> bool:
    # A CUDA error (illegal address, device-side assert, ...) poisons the context for every later kernel.
    return isinstance(exc, FatalEngineError) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


class Engine:
    def __init__(self, model, scheduler: Scheduler, runner: ModelRunner, metrics=None, threads: int | None = None,
                 warm_rows: int = 0, batch_invariant: bool = False):
        """warm_rows: before the first step, build the matmul kernels of every padded row count up to this
        (ModelRunner.warm_up), on the engine thread and its thread count, as the steps will run them.
        batch_invariant: run each request's plan in a forward of its own (its outputs then never depend on what
        else runs: see EngineConfig.batch_invariant)."""
        self.model, self.scheduler, self.runner, self.metrics = model, scheduler, runner, metrics
        self.threads, self.warm_rows, self.batch_invariant = threads, warm_rows, batch_invariant
        self.after_step: list = []  # called on the engine thread after each step (AsyncEngine's settle)
        self.lock = threading.Condition()
        self.steps = 0
        self.fatal: BaseException | None = None  # set when a fatal error stopped the loop
        self.progress_at = time.monotonic()  # the last step's end, or when work arrived at an idle engine
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="diffuserve-engine", daemon=True)

    # -- called from any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.fatal is not None or self._stop:
                raise Draining("the engine has stopped")
            self.scheduler.add(req)  # QueueFull / Draining / ValueError propagate to the caller
            self._observe_queues()
            self.lock.notify_all()

    def attach_metrics(self, metrics) -> None:
        """Start reporting to `metrics` (after the warm-up, which is nobody's request), gauges from now on."""
        with self.lock:
            self.metrics = metrics
            self._observe_queues()

    def abort_all(self, reason: str = "abort") -> int:
        """Abort every waiting and running request (the drain timeout ran out); -> how many."""
        with self.lock:
            reqs = [r for r in itertools.chain(self.scheduler.waiting, self.scheduler.running)
                    if r.abort_reason is None and r.phase in (RequestStatus.WAITING, RequestStatus.RUNNING)]
            for req in reqs:
                req.abort_reason = reason
            self.lock.notify_all()
        return len(reqs)

    def abort(self, req: Request, reason: str = "abort") -> None:
        with self.lock:
            if req.phase in (RequestStatus.WAITING, RequestStatus.RUNNING) and req.abort_reason is None:
                req.abort_reason = reason
                self.lock.notify_all()

    @property
    def alive(self) -> bool:
        """The engine thread is running (liveness: /health is 503 once it is not)."""
        return self._thread.is_alive() and self.fatal is None

    @property
    def stopped(self) -> bool:
        """The engine thread has ended (after stop(), or never started)."""
        return not self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds that requests have been waiting or running with no engine step finishing (0 when idle)."""
        return 0.0 if self.scheduler.idle else time.monotonic() - self.progress_at

    def drain(self) -> None:
        with self.lock:
            self.scheduler.draining = True

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.lock:
            while not self.scheduler.idle:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.warm_rows:
            t0 = time.monotonic()
            sizes = self.runner.warm_up(self.warm_rows)
            log.info("matmul kernels for %d row counts up to %d built in %.1fs", sizes, self.warm_rows,
                     time.monotonic() - t0)
        while True:
            with self.lock:
                while self.scheduler.idle and not self._stop:
                    leak = self.scheduler.leaks()
                    if leak:
                        log.error("leak check failed: %s", leak)
                    self.lock.wait()
                    self.progress_at = time.monotonic()  # an idle engine was not stalled
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # the loop survives anything a step does, unless the device is gone
                if is_fatal(exc):
                    self._die(exc)
                    return
                log.exception("engine step failed")
            finally:  # the step's outputs go out even when it failed (and the engine's last ones when it died)
                self.progress_at = time.monotonic()
                for hook in self.after_step:
                    hook()

    def _die(self, exc: BaseException) -> None:
        log.critical("fatal engine error, stopping: %s", exc, exc_info=exc)
        with self.lock:
            self.fatal = exc
            for req in itertools.chain(list(self.scheduler.waiting), list(self.scheduler.running)):
                req.end(RequestStatus.FAILED, "error", f"the engine stopped: {type(exc).__name__}: {exc}")
                self._retire(req)
            self.lock.notify_all()

    def step(self) -> None:
        """One engine step (public so tests can drive the engine synchronously)."""
        with self.lock:
            self._end_aborted()
            admitted = self.scheduler.admit()
            running = list(self.scheduler.running)  # the admitted ones last
            self._observe_queues()
        for req in admitted:
            req.phase, req.admitted_at = RequestStatus.RUNNING, time.monotonic()
            self._guard(req, lambda r=req: self._start(r))
        stepping = [r for r in running if r.phase is RequestStatus.RUNNING]
        if stepping:
            self._step_batch(stepping)
        with self.lock:
            for req in running:
                if req.phase is not RequestStatus.RUNNING:
                    self._retire(req)
            self.steps += 1
            self._observe_queues()
            self.lock.notify_all()

    def _start(self, req: Request) -> None:
        req.start(self.model.spec, req.kv)
        if req.state.done:  # a method that decided everything without a forward
            req.emit(req.canvas(), final=True)

    def _step_batch(self, reqs: list[Request]) -> None:
        plans = []
        for req in reqs:
            self._guard(req, lambda r=req: plans.append((r, r.plan())))
        chosen = set(self.scheduler.batch([(p.rows, r.group, r.waited) for r, p in plans]))
        for i, (req, _) in enumerate(plans):  # the ones left out go first next time
            req.waited = 0 if i in chosen else req.waited + 1
        plans = [plans[i] for i in sorted(chosen)]
        if self.batch_invariant:
            outcome, stats = self._isolate(plans)
        else:
            try:
                results, stats = self.runner.step([(r.kv, p) for r, p in plans])
                outcome = list(zip(plans, results))
            except Exception:
                outcome, stats = self._isolate(plans)
        tally = [0, 0]  # tokens committed, refresh steps
        for (req, plan), result in outcome:
            self._guard(req, lambda r=req, p=plan, res=result: self._commit(r, p, res, tally))
        if self.metrics is not None:
            self.metrics.on_step(stats, *tally)

    def _isolate(self, plans) -> tuple[list, StepStats]:
        """Each request in a forward of its own (the batched forward raised, or batch_invariant); a request that
        fails alone fails, only it."""
        outcome, total = [], StepStats()
        for req, plan in plans:
            try:
                (result,), stats = self.runner.step([(req.kv, plan)])
            except Exception as exc:
                if is_fatal(exc):
                    raise
                self._fail(req, exc)
                continue
            outcome.append(((req, plan), result))
            for k in ("requests", "rows", "keys", "pruned"):
                setattr(total, k, getattr(total, k) + getattr(stats, k))
        return outcome, total

    def _commit(self, req: Request, plan, result, tally: list[int]) -> None:
        state, view = req.state, req.canvas_view
        masks = state.undecoded()
        if view is not None:
            view.snapshot(state)
        state.commit(plan, result)
        req.forward_calls = state.forward_calls
        tally[0] += masks - state.undecoded()
        tally[1] += int(plan.refresh)
        # emit marks the request FINISHED once its output is complete
        lp = None if state.logprobs is None else state.logprobs[state.prompt_len:]
        top = (state.top_ids[state.prompt_len:], state.top_lps[state.prompt_len:]) if state.top_k else None
        req.emit(req.canvas(), final=state.done, logprobs=lp, top=top,
                 event=None if view is None else view.event(state, plan, result))

    def _guard(self, req: Request, fn) -> None:
        if req.phase is not RequestStatus.RUNNING:
            return
        try:
            fn()
        except Exception as exc:
            if is_fatal(exc):
                raise
            self._fail(req, exc)

    def _fail(self, req: Request, exc: Exception) -> None:
        if isinstance(exc, ValueError):  # the method rejected the request's options: the client's error
            req.end(RequestStatus.FAILED, "error", str(exc), status=400)
            return
        log.error("request %s failed", req.request_id, exc_info=exc)
        req.end(RequestStatus.FAILED, "error", f"generation failed: {type(exc).__name__}: {exc}")

    def _end_aborted(self) -> None:
        now = time.monotonic()
        for req in itertools.chain(list(self.scheduler.waiting), list(self.scheduler.running)):
            if req.abort_reason is None and req.deadline is not None and now > req.deadline:
                req.abort_reason = "timeout"
            if req.abort_reason is not None:
                req.end(RequestStatus.ABORTED, req.abort_reason)
                self._retire(req)

    def _retire(self, req: Request) -> None:
        self.scheduler.retire(req)
        req.finished_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.on_finish(req, req.completion_tokens)

    def _observe_queues(self) -> None:
        if self.metrics is not None:
            pool = self.scheduler.pool
            self.metrics.on_queues(*self.scheduler.counts(), pool.bytes_in_use, pool.pages_in_use / pool.usable_pages)


class RequestGroup:
    """The outputs of requests submitted together (a body's prompts x n choices), as (index, output) pairs in the
    order they arrive; leaving the iteration early (or `abort()`) aborts every request still running."""

    def __init__(self, engine: Engine, queue: asyncio.Queue):
        self.engine, self.queue = engine, queue
        self.requests: list[Request] = []
        self.index: dict[str, int] = {}
        self.open: set[str] = set()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self.open:
                out = await self.queue.get()
                if out.finished:
                    self.open.discard(out.request_id)
                yield self.index[out.request_id], out
        finally:
            self.abort()

    def abort(self) -> None:
        for req in self.requests:
            if req.request_id in self.open:
                self.engine.abort(req)


class Mailbox:
    """Outputs cross from the engine thread to one event loop in batches. Posts made on the engine thread during a
    step are held until the step ends (`flush`): the loop then wakes once for all of them, and writes them while
    the engine waits (`settle`), instead of both threads running at once on few cores. Posts from any other thread
    (a rejection at submit) wake the loop at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine_thread: threading.Thread):
        self.loop, self.engine_thread = loop, engine_thread
        self.items, self.lock = [], threading.Lock()
        self.woken = False  # a _deliver is scheduled and has not yet taken the items
        self.delivered = threading.Event()
        self.delivered.set()

    def post(self, queue: asyncio.Queue, out: RequestOutput) -> None:
        with self.lock:
            self.items.append((queue, out))
        if threading.current_thread() is not self.engine_thread:
            self.flush()

    def flush(self) -> None:
        """Wake the loop for the held items (once, however many)."""
        with self.lock:
            if not self.items or self.woken:
                return
            self.woken = True
            self.delivered.clear()
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.delivered.set()

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.woken = self.items, [], False
        for queue, out in items:
            queue.put_nowait(out)
        # The readers woken above are already in the loop's FIFO ready queue: this runs after they have written.
        self.loop.call_soon(self.delivered.set)

    def settle(self, timeout: float) -> None:
        """On the engine thread: deliver what the step posted and wait until the loop has written it."""
        self.flush()
        self.delivered.wait(timeout)


class AsyncEngine:
    """The server's view of the engine: `submit` from the event loop, then iterate the outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Mailbox
        self._boxes_lock = threading.Lock()
        engine.after_step.append(self._settle)

    def _settle(self) -> None:
        # The engine's next step waits for the event loop to write this step's outputs. On few cores the two
        # threads otherwise run at once and each slows the other more than the loop's work takes on its own:
        # the OpenMP team of the step stalls whenever one of its threads is preempted, and the GIL changes hands.
        with self._boxes_lock:
            boxes = list(self._mailboxes.values())
        for box in boxes:
            box.settle(SETTLE_TIMEOUT_S)

    def submit(self, makers: list) -> RequestGroup:
        """makers: callables sink -> Request. Raises QueueFull / Draining / ValueError before any output; then
        the requests already submitted are aborted, so a body's choices are taken all or none."""
        loop = asyncio.get_running_loop()
        with self._boxes_lock:
            box = self._mailboxes.get(loop) or self._mailboxes.setdefault(loop, Mailbox(loop, self.engine._thread))
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        group = RequestGroup(self.engine, queue)
        try:
            for i, make in enumerate(makers):
                req = make(lambda out: box.post(queue, out))
                self.engine.submit(req)
                group.requests.append(req)
                group.index[req.request_id] = i
                group.open.add(req.request_id)
        except Exception:
            group.abort()
            raise
        return group
