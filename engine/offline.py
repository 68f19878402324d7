"""Offline generation through the serving engine's own step: one request, a KV pool of one.

`generate` is what `LLM.generate`, `diffuserve generate`, the conformance runner and the benchmarks call: the
request is admitted, stepped (plan -> the runner's batched forward -> commit) and retired by the same `Engine`,
`Scheduler` and `ModelRunner` the server runs, so there is one generation path. `engine_for` + `run_to_idle` are
the same for many requests at once (conformance --engine, bench.decode's batches).
"""

from __future__ import annotations

import torch

from .decoding import DecodeOptions, DecodeResult, Method, get_method
from .engine import Engine
from .model import DiffusionLM
from .model.kv_pool import KVPool
from .request import Request
from .runner import ModelRunner
from .scheduler import Limits, Scheduler


class Kept(Request):
    """A request whose decoding state outlives its retirement (the caller reads the final canvas from it)."""

    kept = None

    def start(self, spec, kv) -> None:
        super().start(spec, kv)
        self.kept = self.state


def engine_for(model: DiffusionLM, requests: list[Request], limits: Limits | None = None) -> Engine:
    """An engine over a KV pool just big enough for `requests`, which are submitted (a fixed pool of gigabytes
    costs about a second of zero-filling per engine). Default limits: all of them running at once."""
    pool = KVPool.for_requests(model, [r.capacity for r in requests])
    n = max(1, len(requests))
    engine = Engine(model, Scheduler(limits or Limits(max_running=n, max_waiting=n), pool), ModelRunner(model, pool))
    for r in requests:
        engine.submit(r)
    return engine


def run_to_idle(engine: Engine) -> None:
    """Step the engine on this thread until every request it holds has finished."""
    while not engine.scheduler.idle:
        engine.step()


def generate(model: DiffusionLM, method: Method | str, prompt: torch.Tensor, opts: DecodeOptions,
             gen: torch.Generator | None = None) -> DecodeResult:
    """prompt [B, Lp]: one sequence, or a parity case's batch decoded as one state (the reference's own batch)."""
    method = get_method(method) if isinstance(method, str) else method
    rows = prompt.tolist()
    outs = []
    req = Kept("offline", rows[0], method, opts, 0, outs.append, batch_prompts=rows if len(rows) > 1 else None,
                gen=gen)
    run_to_idle(engine_for(model, [req], Limits(max_running=1, max_waiting=1, max_rows_per_step=1 << 30)))
    last = outs[-1] if outs else None
    if last is None or last.error is not None:
        err = "no output" if last is None else last.error
        raise (ValueError if last is not None and last.status == 400 else RuntimeError)(err)
    return req.kept.result()


class Solo:
    """One decoding state stepped by hand through a runner and a KV pool of its own (tests that look between
    steps: partitions, cached K/V)."""

    def __init__(self, model: DiffusionLM, state, capacity: int | None = None):
        self.state = state
        capacity = capacity or state.x.numel()
        self.pool = KVPool.for_requests(model, [capacity])
        self.handle = self.pool.allocate(capacity)
        self.runner = ModelRunner(model, self.pool)

    def step(self):
        """-> (plan, result) of one step, committed."""
        plan = self.state.plan()
        (result,), _ = self.runner.step([(self.handle, plan)])
        self.state.commit(plan, result)
        return plan, result

    def kv(self, layer: int, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached K/V of these positions, [T, kv_heads * head_dim] each."""
        slots = torch.from_numpy(self.handle.slot_map[positions])
        return self.pool.k[layer][slots], self.pool.v[layer][slots]
