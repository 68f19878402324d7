"""Methods `fast_dllm`, `fast_dllm_prefix`, `fast_dllm_dual`: NVlabs/Fast-dLLM's LLaDA loops, token for token.

All three decode block by block, committing either the integer schedule's top-k (threshold None) or every masked
block position whose float64 confidence reaches `threshold` (at least the best one), or by the `factor` rule.
 - fast_dllm: a full forward every step.
 - fast_dllm_prefix: a full forward at each block start fills the KV cache; later steps forward the block and
   everything right of it against the cached prefix.
 - fast_dllm_dual: as prefix, but later steps forward only the block, attending to the whole cache (the suffix's
   K/V stay as the block-start forward left them) and overwriting the block's own K/V.
Each is a `LoopState` (decoding.step): the reference loop, with each model call a yielded plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import LLADA
from .llada import block_plan
from .options import Blocks, LladaSampling
from .registry import check, register
from .sampling import (argmax, chosen_probability, factor_select, gumbel_perturb, llada_schedule, random_confidence,
                       threshold_select, top_k_select)
from .step import LoopState, full_plan, span_plan


@dataclass(frozen=True)
class FastDllmOptions(Blocks, LladaSampling):
    threshold: float | None = None  # commit every masked block position this confident (at least the best one)
    factor: float | None = None  # Fast-dLLM's factor rule (used when threshold is None)


def transfer(logits, opts: FastDllmOptions, mask_index, x, count, gen):
    """Fast-dLLM's get_transfer_index over one slice: (candidate tokens, bool commit mask), both like `x`."""
    x0 = argmax(gumbel_perturb(logits, opts.temperature, gen))
    if opts.remasking == "low_confidence":
        conf = chosen_probability(logits, x0, mask_index, torch.float64)  # float64, as the reference
    else:
        conf = random_confidence((x0.shape[0], x0.shape[1]), gen, x0.device)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, conf, -np.inf)
    if opts.threshold is not None:
        return x0, threshold_select(confidence, opts.threshold)
    if opts.factor is not None:
        return x0, factor_select(confidence, opts.factor)
    return x0, top_k_select(confidence, count)


def block_setup(opts: FastDllmOptions) -> tuple[int, int, int]:
    """The block loops' shared start (Fast-dLLM's and FreeCache's): checked options -> (block_length, num_blocks,
    steps_per_block). The canvas itself is the state's `x`."""
    check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
    return block_plan(opts)


@register("fast_dllm", LLADA, "Fast-dLLM without cache: full forward per step, threshold/factor parallel commits",
          FastDllmOptions)
class FastDllm(LoopState):
    def run(self):
        block, num_blocks, steps = block_setup(self.opts)
        x, opts, gen, mask_id, lp = self.x, self.opts, self.gen, self.spec.mask_id, self.prompt_len
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            counts = llada_schedule(x[:, start:end] == mask_id, steps)
            i = 0
            while True:
                mask_index = x == mask_id
                logits = (yield full_plan(x)).stack()  # [B, N, V]
                mask_index[:, end:] = False
                x0, chosen = transfer(logits, opts, mask_index, x, counts[:, min(i, steps - 1)], gen)
                x[chosen] = x0[chosen]
                i += 1
                if not (x[:, start:end] == mask_id).any():
                    break


class _Cached(LoopState):
    """Fast-dLLM's cached loops; `dual` picks the dual cache (block only) over the prefix cache (block + suffix)."""

    dual = False

    def run(self):
        block, num_blocks, steps = block_setup(self.opts)
        x, opts, gen, mask_id, lp = self.x, self.opts, self.gen, self.spec.mask_id, self.prompt_len
        total = x.shape[1]
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            counts = llada_schedule(x[:, start:end] == mask_id, steps)
            # Block start: a full forward refreshes every cached K/V and makes the block's first commits.
            logits = (yield full_plan(x)).stack()
            mask_index = x == mask_id
            mask_index[:, end:] = False
            x0, chosen = transfer(logits, opts, mask_index, x, counts[:, 0], gen)
            x[chosen] = x0[chosen]
            i = 1
            while True:  # the reference always makes at least one cached step per block, even if the block is full
                q_end = end if self.dual else total  # dual: the block only; prefix: the block and all of its right
                view = x[:, start:q_end]  # a view: commits land in x
                logits = (yield span_plan(view, start, total, total)).stack()
                mask_index = view == mask_id
                mask_index[:, block:] = False
                if not self.dual:
                    gumbel_perturb(logits, opts.temperature, gen)  # the reference draws (and discards) noise here
                x0, chosen = transfer(logits, opts, mask_index, view, counts[:, min(i, steps - 1)], gen)
                view[chosen] = x0[chosen]
                i += 1
                if not (x[:, start:end] == mask_id).any():
                    break


@register("fast_dllm_prefix", LLADA, "Fast-dLLM prefix cache: block-start refresh, then block+suffix vs cached prefix",
          FastDllmOptions)
class FastDllmPrefix(_Cached):
    dual = False


@register("fast_dllm_dual", LLADA, "Fast-dLLM dual cache: block-start refresh, then the block alone vs all cached K/V",
          FastDllmOptions)
class FastDllmDual(_Cached):
    dual = True
