"""A model-free runner for testing the scheduler, the engine loop and the window bookkeeping on CPU.

`FakeRunner.step` has `ModelRunner.step`'s contract but returns logits that make each candidate row choose the
scripted token of its position (`script(prompt_ids) -> output ids`, then EOS), with an optional delay per step and
injected faults: a request whose prompt contains `fault_token` makes the batched forward raise (from its step
`fault_after` on, so a stream can fail midway), and raises again when run alone, so only it fails; one whose prompt
contains `fatal_token` raises a `FatalEngineError` (the device is gone: the engine stops). Decoders are real
`WindowDecoder`s built on `FakeModel` (a spec, no weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model.spec import ModelSpec
from .runner import Rows, StepStats


@dataclass
class FakeModel:
    spec: ModelSpec
    device: str = "cpu"


@dataclass
class FakeRunner:
    spec: ModelSpec
    script: Callable[[list[int]], list[int]]
    delay: float = 0.0
    fault_token: int | None = None
    fault_after: int = 0  # a faulty request raises from its decoder's step `fault_after` on (0: at once)
    fatal_token: int | None = None
    batches: list[int] = field(default_factory=list)  # requests per step, for assertions

    def step(self, work) -> tuple[list[Rows], StepStats]:
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(len(work))
        stats = StepStats(requests=len(work))
        out = []
        for dec, _, plan in work:
            prompt = dec.x[: dec.prompt_len].tolist()
            if self.fault_token is not None and self.fault_token in prompt and dec.step >= self.fault_after:
                raise RuntimeError("injected fault")
            if self.fatal_token is not None and self.fatal_token in prompt:
                from .engine import FatalEngineError

                raise FatalEngineError("injected fatal fault")
            want = self.script(prompt) + [self.spec.eos_id] * dec.x.shape[0]
            rows = plan.positions[plan.candidates] - dec.prompt_len  # [R] offsets into the generation
            logits = torch.zeros(len(rows), self.spec.vocab_size)
            logits[torch.arange(len(rows)), torch.tensor([want[int(r)] for r in rows], dtype=torch.long)] = 20.0
            out.append(Rows.of(logits))
            stats.rows += len(plan.positions)
        return out, stats
