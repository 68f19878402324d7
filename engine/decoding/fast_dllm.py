"""Methods `fast_dllm`, `fast_dllm_prefix`, `fast_dllm_dual`: NVlabs/Fast-dLLM's LLaDA loops, token for token.

All three decode block by block, committing either the integer schedule's top-k (threshold None) or every masked
block position whose float64 confidence reaches `threshold` (at least the best one), or by the `factor` rule.
 - fast_dllm: a full forward every step.
 - fast_dllm_prefix: a full forward at each block start fills the KV cache; later steps forward the block and
   everything right of it against the cached prefix.
 - fast_dllm_dual: as prefix, but later steps forward only the block, attending to the whole cache (the suffix's
   K/V stay as the block-start forward left them) and overwriting the block's own K/V.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import LLADA, DiffusionLM, span_forward
from .llada import block_plan, new_canvas
from .registry import DecodeOptions, DecodeResult, check, register
from .sampling import (argmax, factor_select, gumbel_perturb, llada_schedule, random_confidence, threshold_select,
                       top_k_select)


def transfer(logits, opts: DecodeOptions, mask_index, x, count, gen):
    """Fast-dLLM's get_transfer_index over one slice: (candidate tokens, bool commit mask), both like `x`."""
    x0 = argmax(gumbel_perturb(logits, opts.temperature, gen))
    if opts.remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        conf = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    else:
        conf = random_confidence((x0.shape[0], x0.shape[1]), gen, x0.device)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, conf, -np.inf)
    if opts.threshold is not None:
        return x0, threshold_select(confidence, opts.threshold)
    if opts.factor is not None:
        return x0, factor_select(confidence, opts.factor)
    return x0, top_k_select(confidence, count)


def block_setup(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions):
    """The block loops' shared start (Fast-dLLM's and FreeCache's): checked options, the canvas and the block plan."""
    check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
    check(opts.cfg_scale == 0, "Fast-dLLM methods do not support cfg_scale")
    block, num_blocks, steps = block_plan(opts)
    return new_canvas(prompt, opts.gen_length, model.spec.mask_id), block, num_blocks, steps


@register("fast_dllm", LLADA, "Fast-dLLM without cache: full forward per step, threshold/factor parallel commits")
def generate(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions,
             gen: torch.Generator | None = None) -> DecodeResult:
    x, block, num_blocks, steps = block_setup(model, prompt, opts)
    mask_id, lp, calls = model.spec.mask_id, prompt.shape[1], 0
    for b in range(num_blocks):
        start, end = lp + b * block, lp + (b + 1) * block
        counts = llada_schedule(x[:, start:end] == mask_id, steps)
        i = 0
        while True:
            calls += 1
            mask_index = x == mask_id
            logits = model.logits(x)
            mask_index[:, end:] = False
            x0, chosen = transfer(logits, opts, mask_index, x, counts[:, min(i, steps - 1)], gen)
            x[chosen] = x0[chosen]
            i += 1
            if not (x[:, start:end] == mask_id).any():
                break
    return DecodeResult(ids=x[:, lp:], forward_calls=calls)


def _cached(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions, gen, dual: bool) -> DecodeResult:
    x, block, num_blocks, steps = block_setup(model, prompt, opts)
    mask_id, lp, total = model.spec.mask_id, prompt.shape[1], x.shape[1]
    cache = model.new_cache(x.shape[0], total)
    calls = 0
    for b in range(num_blocks):
        start, end = lp + b * block, lp + (b + 1) * block
        counts = llada_schedule(x[:, start:end] == mask_id, steps)
        # Block start: a full forward refreshes every cached K/V and makes the block's first commits.
        logits = span_forward(model, x, 0, cache, total)
        calls += 1
        mask_index = x == mask_id
        mask_index[:, end:] = False
        x0, chosen = transfer(logits, opts, mask_index, x, counts[:, 0], gen)
        x[chosen] = x0[chosen]
        i = 1
        while True:  # the reference always makes at least one cached step per block, even if the block is full
            q_end = end if dual else total  # dual: the block only; prefix: the block and all of its right
            view = x[:, start:q_end]
            logits = span_forward(model, view, start, cache, total)
            calls += 1
            mask_index = view == mask_id
            mask_index[:, block:] = False
            if not dual:
                gumbel_perturb(logits, opts.temperature, gen)  # the reference draws (and discards) noise here
            x0, chosen = transfer(logits, opts, mask_index, view, counts[:, min(i, steps - 1)], gen)
            view[chosen] = x0[chosen]
            i += 1
            if not (x[:, start:end] == mask_id).any():
                break
    return DecodeResult(ids=x[:, lp:], forward_calls=calls)


@register("fast_dllm_prefix", LLADA, "Fast-dLLM prefix cache: block-start refresh, then block+suffix vs cached prefix")
def generate_prefix(model, prompt, opts, gen=None):
    return _cached(model, prompt, opts, gen, dual=False)


@register("fast_dllm_dual", LLADA, "Fast-dLLM dual cache: block-start refresh, then the block alone vs all cached K/V")
def generate_dual(model, prompt, opts, gen=None):
    return _cached(model, prompt, opts, gen, dual=True)
