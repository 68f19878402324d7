"""A model-free runner (tests only) for testing the scheduler, the engine loop and the window bookkeeping on CPU.

`FakeRunner.step` has `ModelRunner.step`'s contract (a (KV handle, StepPlan) per request, plain data) and returns
logits that make each requested row choose the scripted token of its position (`script(prompt_ids) -> output ids`,
then EOS), with an optional delay per step and injected faults: a request whose prompt contains `fault_token` makes
the batched forward raise (from its step `fault_after` on, so a stream can fail midway), and raises again when run
alone, so only it fails; one whose prompt contains `fatal_token` raises a `FatalEngineError` (the device is gone:
the engine stops). Like a real model it sees only what the plans carry: it learns a request's prompt from the first
rows written to its cache (every method's first step computes the prompt) and remembers them per KV handle.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from diffuserve.engine.decoding.step import Rows, StepResult
from diffuserve.engine.model.spec import ModelSpec
from diffuserve.engine.runner import StepStats


@dataclass
class FakeModel:
    spec: ModelSpec
    device: str = "cpu"


@dataclass
class _Seen:
    prompt: list[int]
    prompt_len: int
    steps: int = 0


@dataclass
class FakeRunner:
    spec: ModelSpec
    script: Callable[[list[int]], list[int]]
    delay: float = 0.0
    fault_token: int | None = None
    fault_after: int = 0  # a faulty request raises from its step `fault_after` on (0: at once)
    fatal_token: int | None = None
    batches: list[int] = field(default_factory=list)  # requests per step, for assertions
    seen: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def step(self, work) -> tuple[list[StepResult], StepStats]:
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(len(work))
        stats = StepStats(requests=len(work))
        out = []
        for handle, plan in work:
            seen = self._learn(handle, plan)
            if self.fault_token is not None and self.fault_token in seen.prompt and seen.steps >= self.fault_after:
                raise RuntimeError("injected fault")
            if self.fatal_token is not None and self.fatal_token in seen.prompt:
                from diffuserve.engine.engine import FatalEngineError

                raise FatalEngineError("injected fatal fault")
            want = self.script(seen.prompt)
            res = StepResult()
            for seg in plan.segments:
                # [R] offsets into the generation of the positions these rows predict (Dream: row p - 1 predicts p)
                offsets = seg.positions[seg.logits_rows] + int(self.spec.shifted_logits) - seen.prompt_len
                tokens = [want[o] if 0 <= o < len(want) else self.spec.eos_id for o in offsets.tolist()]
                logits = torch.zeros(len(offsets), self.spec.vocab_size)
                logits[torch.arange(len(offsets)), torch.tensor(tokens, dtype=torch.long)] = 20.0
                res.rows.append(Rows.of(logits))
                stats.rows += len(seg.positions)
            out.append(res)
        for handle, _ in work:
            self.seen[handle].steps += 1
        return out, stats

    def _learn(self, handle, plan) -> _Seen:
        if handle not in self.seen:  # the first step computes the prompt: its leading unmasked rows
            seg = plan.segments[0]
            order = np.argsort(seg.positions)
            ids, pos = seg.ids[order], seg.positions[order]
            n = int(np.argmax(ids == self.spec.mask_id)) if (ids == self.spec.mask_id).any() else len(ids)
            assert (pos[:n] == np.arange(n)).all(), "the first step must compute the prompt"
            self.seen[handle] = _Seen(ids[:n].tolist(), n)
        return self.seen[handle]
