"""Methods `fast_dllm_dream_prefix`, `fast_dllm_dream_dual`: Fast-dLLM's block-cached Dream loops, token for token.

Each block starts with a full forward that refreshes the KV cache, samples every position and commits the block's
first position unconditionally: with shifted logits a cached step whose queries start at the block cannot predict
the block's first position. Later steps forward the block and its right (prefix) or the block alone (dual).
With alg "confidence_threshold" they commit every block mask whose probability reaches the threshold (at least the
best); any other alg runs the per-block linspace schedule with negative-entropy confidence, as the reference does,
including its quirk that one step per block leaves the block's masks in place.
"""

from __future__ import annotations

import torch

from ..model import DREAM, DiffusionLM, span_forward
from .dream import commit_ranked
from .llada import block_plan, new_canvas
from .registry import DecodeOptions, DecodeResult, check, register
from .sampling import dream_commit_count, sample_tokens, shift_logits, threshold_select


def threshold_step(view, mask_index, logits, opts: DecodeOptions, block: int, gen) -> None:
    confidence, x0 = sample_tokens(logits[mask_index], opts.temperature, opts.top_p, opts.top_k, gen=gen)
    full = torch.full(view.shape, -torch.inf, dtype=logits.dtype, device=view.device)
    full[mask_index] = confidence
    full[:, block:] = -torch.inf  # masks right of the block were sampled (and drew noise) but cannot commit
    proposal = view.clone()
    proposal[mask_index] = x0
    chosen = threshold_select(full, opts.threshold if opts.threshold is not None else 0.9)
    view[chosen] = proposal[chosen]


def schedule_step(view, mask_index, logits, opts: DecodeOptions, block: int, i: int, steps: int,
                   timesteps, gen) -> None:
    mask_index[:, block:] = False
    confidence, x0 = sample_tokens(logits[mask_index], opts.temperature, opts.top_p, opts.top_k,
                                   neg_entropy=True, gen=gen)
    count = dream_commit_count(mask_index.sum(), mask_index.shape[0], timesteps[i + 1], timesteps[i],
                               last=i >= steps - 1)
    commit_ranked(view, mask_index, x0, confidence, count, opts.alg_temp, gen)


def _generate(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions, gen, dual: bool) -> DecodeResult:
    if opts.block_length is None:
        opts = opts.with_(block_length=min(32, opts.gen_length))
    block, num_blocks, steps = block_plan(opts)
    threshold_mode = opts.alg == "confidence_threshold"
    mask_id, lp = model.spec.mask_id, prompt.shape[1]
    x = new_canvas(prompt, opts.gen_length, mask_id)
    total = x.shape[1]
    cache = model.new_cache(x.shape[0], total)
    timesteps = torch.linspace(1, opts.eps, steps + 1, device=x.device)
    calls = 0
    for b in range(num_blocks):
        start, end = lp + b * block, lp + (b + 1) * block
        logits = shift_logits(span_forward(model, x, 0, cache, total))
        calls += 1
        _, x0 = sample_tokens(logits, opts.temperature, opts.top_p, opts.top_k, gen=gen)
        x[:, start] = x0[:, start]
        i = 1
        while True:
            view = x[:, start:end] if dual else x[:, start:]
            mask_index = view == mask_id
            logits = shift_logits(span_forward(model, view, start, cache, total))
            calls += 1
            if threshold_mode:
                threshold_step(view, mask_index, logits, opts, block, gen)
            else:
                if i == steps:
                    break
                schedule_step(view, mask_index, logits, opts, block, i, steps, timesteps, gen)
                i += 1
            if not (x[:, start:end] == mask_id).any():
                break
    return DecodeResult(ids=x[:, lp:], forward_calls=calls)


def _validate(opts: DecodeOptions) -> None:
    check(opts.alg in ("confidence_threshold", "entropy", "maskgit_plus", "topk_margin", "origin"),
          f"unknown alg {opts.alg!r}")


@register("fast_dllm_dream_prefix", DREAM, "Fast-dLLM Dream prefix cache: block+suffix vs cached prefix")
def generate_prefix(model, prompt, opts, gen=None):
    _validate(opts)
    return _generate(model, prompt, opts, gen, dual=False)


@register("fast_dllm_dream_dual", DREAM, "Fast-dLLM Dream dual cache: the block alone vs all cached K/V")
def generate_dual(model, prompt, opts, gen=None):
    _validate(opts)
    return _generate(model, prompt, opts, gen, dual=True)
