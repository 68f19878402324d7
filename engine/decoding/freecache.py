"""Method `freecache`: FlashDLM's FreeCache on the LLaDA family (ALGORITHMS.md section 4.2).

Decoded tokens' K/V are frozen rather than refreshed: the generation's first step is one full forward that caches
the prompt; every later step forwards the current block and the whole masked suffix right of it against the
frozen cache. The K/V a block leaves behind are those of its last step, in which its last-committed tokens were
still MASK; they are promoted into the frozen prefix as the next block starts, and nothing recomputes them. That
approximation is what saves Fast-dLLM prefix cache's full forward at every block start.

Commits follow the LLaDA integer schedule (as the authors' code) or, as in Fast-dLLM, a confidence threshold or
factor when given. early_stop: once a row commits an EOS, every position after its first EOS becomes EOS, and the
row stops as soon as nothing left of that EOS is masked. A `LoopState` (decoding.step): each forward is a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import LLADA
from .fast_dllm import FastDllmOptions, block_setup, transfer
from .registry import register
from .sampling import llada_schedule
from .step import LoopState, span_plan


def fill_after_eos(x: torch.Tensor, lp: int, eos: int) -> None:
    """In place: per row of x [B, Lp + gen], every generated position after the first EOS becomes EOS."""
    gen_part = x[:, lp:]  # [B, gen] view
    seen = (gen_part == eos).cumsum(1) > 0  # True from each row's first EOS on
    after = torch.zeros_like(seen)
    after[:, 1:] = seen[:, :-1]  # strictly after it
    gen_part[after] = eos


@dataclass(frozen=True)
class FreeCacheOptions(FastDllmOptions):
    early_stop: bool = False  # EOS after a row's first EOS; the row stops once nothing left of it is masked


@register("freecache", LLADA, "FreeCache: decoded K/V frozen and promoted at block end; block+suffix vs frozen prefix",
          FreeCacheOptions)
class FreeCache(LoopState):
    def run(self):
        block, num_blocks, steps = block_setup(self.opts)
        x, opts, gen, lp = self.x, self.opts, self.gen, self.prompt_len
        mask_id, eos, total = self.spec.mask_id, self.spec.eos_id, x.shape[1]
        calls = 0
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            counts = llada_schedule(x[:, start:end] == mask_id, steps)
            i = 0
            while (x[:, start:end] == mask_id).any():  # an early stop may have filled the block already
                q_from = 0 if calls == 0 else start  # only the generation's first forward is full
                view = x[:, q_from:]  # [B, total - q_from], a view: commits land in x
                logits = (yield span_plan(view, q_from, total, total)).stack()
                calls += 1
                mask_index = view == mask_id
                mask_index[:, end - q_from:] = False  # only the current block may be written
                x0, chosen = transfer(logits, opts, mask_index, view, counts[:, min(i, steps - 1)], gen)
                view[chosen] = x0[chosen]
                i += 1
                if opts.early_stop:
                    fill_after_eos(x, lp, eos)
            if opts.early_stop and not (x[:, lp:] == mask_id).any():
                break
