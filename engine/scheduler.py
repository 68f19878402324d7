"""Scheduler: the waiting and running queues, admission within limits, and retirement. It owns queues only.

Admission is first come, first served: the head of the waiting queue is admitted while the running set is under
`max_running` and the KV pool has pages for its whole canvas; a head that does not fit yet blocks the queue (no
overtaking, so a long request is never starved by short ones). One exception: a body (one HTTP request's prompts x
n choices, `Request.group`) holds at most `body_slots` running slots (half of them by default); its other requests
wait for its own to finish while later bodies are admitted past them, so that one body cannot take every slot. Beyond `max_running + max_waiting` requests held in
all, `add` refuses with `QueueFull` (the server answers 429); while draining it refuses with `Draining` (503).

Each step's rows are shared by fair share (`batch`): the budget `max_rows_per_step` is split equally between the
bodies running (a body's n choices share one part), and a request whose plan fits its part is computed every step.
Plans larger than their part (a whole canvas recomputed each step) take turns in what is left, longest-waiting
first, one of them always. So no request and no body can hold back another's steps; it can only make the steps
it shares longer, by at most its own rows.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from .model.kv_pool import KVPool
from .request import Request, RequestStatus


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    max_running: int = 64
    max_waiting: int = 256
    max_rows_per_step: int = 8192  # query rows one batched forward may compute
    max_running_per_body: int | None = None  # running slots one body's requests may hold (None: max_running // 2)

    @property
    def body_slots(self) -> int:
        return self.max_running_per_body or max(1, self.max_running // 2)


class Scheduler:
    def __init__(self, limits: Limits, pool: KVPool):
        self.limits, self.pool = limits, pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.draining = False

    def add(self, req: Request) -> None:
        if self.draining:
            raise Draining("the server is shutting down")
        if not self.pool.fits_at_all(req.capacity):
            raise ValueError(f"prompt + max_tokens ({req.capacity} positions) exceeds the KV cache budget")
        # Running slots still free are not queueing: the next step admits into them. So a burst into an idle
        # server is refused only beyond max_running + max_waiting requests held in all.
        free_slots = max(0, self.limits.max_running - len(self.running))
        if len(self.waiting) >= self.limits.max_waiting + free_slots:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """Move requests from the waiting queue into the running set, in order, while they fit. A request whose body
        already holds its share of running slots (`body_slots`) stays queued and the ones behind it may pass: it
        waits for its own body's requests, not for anyone else's."""
        admitted, held = [], Counter(r.group for r in self.running)
        for req in list(self.waiting):
            if len(self.running) >= self.limits.max_running:
                break
            if held[req.group] >= self.limits.body_slots:
                continue
            if not self.pool.can_allocate(req.capacity):
                break  # memory: no overtaking, so a long request is never starved by short ones
            self.waiting.remove(req)
            req.kv = self.pool.allocate(req.capacity)
            self.running.append(req)
            admitted.append(req)
            held[req.group] += 1
        return admitted

    def retire(self, req: Request) -> None:
        """Take a request out of whichever queue holds it and free its KV pages: the one place they are freed."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.kv is not None:
            self.pool.free(req.kv)
            req.kv = None
        req.state = None

    def batch(self, plans: list[tuple[int, str, int]]) -> list[int]:
        """Which running requests (indices) this step computes, given each one's (planned rows, group, steps
        waited). The row budget is shared: each group (a body's prompts x n choices) gets an equal share, split
        evenly among its requests. (1) Every request whose plan fits its share is computed: a request within its
        share never waits a step, whatever the others ask. (2) Of the rest, the one that has waited longest is
        computed even past the budget (so none starves); (3) then others, longest-waiting first, while the budget
        lasts. A step thus computes at most the budget plus one request's rows."""
        budget = self.limits.max_rows_per_step
        sizes = Counter(group for _, group, _ in plans)
        share = {g: budget / len(sizes) / n for g, n in sizes.items()}
        chosen = [i for i, (rows, group, _) in enumerate(plans) if rows <= share[group]]
        total = sum(plans[i][0] for i in chosen)
        over = sorted(set(range(len(plans))) - set(chosen), key=lambda i: (-plans[i][2], i))
        for k, i in enumerate(over):
            if k == 0 or total + plans[i][0] <= budget:
                total += plans[i][0]
                chosen.append(i)
        return sorted(chosen)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def leaks(self) -> str | None:
        """When idle nothing may be held: no KV page, no request in either queue."""
        if self.idle and self.pool.pages_in_use:
            return f"{self.pool.pages_in_use} KV pages held with no request running"
        return None

    def counts(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)


__all__ = ["Draining", "Limits", "QueueFull", "RequestStatus", "Scheduler"]
