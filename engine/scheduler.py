"""Scheduler: the waiting and running queues, admission within limits, and retirement. It owns queues only.

Admission is first come, first served: the head of the waiting queue is admitted while the running set is under
`max_running` and the KV pool has pages for its whole canvas; a head that does not fit yet blocks the queue (no
overtaking, so a long request is never starved by short ones). Beyond `max_running + max_waiting` requests held in
all, `add` refuses with `QueueFull` (the server answers 429); while draining it refuses with `Draining` (503).
"""

from __future__ import annotations

from collections import deque
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
        """Move requests from the head of the waiting queue into the running set while they fit."""
        admitted = []
        while self.waiting and len(self.running) < self.limits.max_running:
            head = self.waiting[0]
            if not self.pool.can_allocate(head.capacity):
                break
            self.waiting.popleft()
            head.kv = self.pool.allocate(head.capacity)
            self.running.append(head)
            admitted.append(head)
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

    def batch(self, rows: list[int]) -> list[int]:
        """Which running requests (indices, in running order) this step computes, given each one's planned rows:
        first fit within `max_rows_per_step` (a large plan does not hold back the smaller ones after it), and always
        the first. The engine moves the ones left out to the front, so a left-out request goes first next step."""
        total, chosen = 0, []
        for i, r in enumerate(rows):
            if not chosen or total + r <= self.limits.max_rows_per_step:
                total += r
                chosen.append(i)
        return chosen

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
