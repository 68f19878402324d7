"""Methods `fast_dllm_dream_prefix`, `fast_dllm_dream_dual`: Fast-dLLM's block-cached Dream loops, token for token.

Each block starts with a full forward that refreshes the KV cache, samples every position and commits the block's
first position unconditionally: with shifted logits a cached step whose queries start at the block cannot predict
the block's first position. Later steps forward the block and its right (prefix) or the block alone (dual).
With alg "confidence_threshold" they commit every block mask whose probability reaches the threshold (at least the
best); any other alg runs the per-block linspace schedule with negative-entropy confidence, as the reference does,
including its quirk that one step per block leaves the block's masks in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DREAM
from .dream import commit_ranked
from .llada import block_plan
from .options import Blocks, DreamSampling
from .registry import check, register
from .sampling import dream_commit_count, sample_tokens, shift_logits, threshold_select
from .step import LoopState, full_plan, span_plan


@dataclass(frozen=True)
class FastDllmDreamOptions(Blocks, DreamSampling):
    """block_length None: min(32, gen_length), the reference's 32. alg confidence_threshold commits by `threshold`;
    any other alg runs the per-block schedule."""

    threshold: float | None = 0.9  # None: 0.9


def threshold_step(view, mask_index, logits, opts: FastDllmDreamOptions, block: int, gen) -> None:
    confidence, x0 = sample_tokens(logits[mask_index], opts.temperature, opts.top_p, opts.top_k, gen=gen)
    full = torch.full(view.shape, -torch.inf, dtype=logits.dtype, device=view.device)
    full[mask_index] = confidence
    full[:, block:] = -torch.inf  # masks right of the block were sampled (and drew noise) but cannot commit
    proposal = view.clone()
    proposal[mask_index] = x0
    chosen = threshold_select(full, opts.threshold if opts.threshold is not None else 0.9)
    view[chosen] = proposal[chosen]


def schedule_step(view, mask_index, logits, opts: FastDllmDreamOptions, block: int, i: int, steps: int,
                   timesteps, gen) -> None:
    mask_index[:, block:] = False
    confidence, x0 = sample_tokens(logits[mask_index], opts.temperature, opts.top_p, opts.top_k,
                                   neg_entropy=True, gen=gen)
    count = dream_commit_count(mask_index.sum(), mask_index.shape[0], timesteps[i + 1], timesteps[i],
                               last=i >= steps - 1)
    commit_ranked(view, mask_index, x0, confidence, count, opts.alg_temp, gen)


class _FastDllmDream(LoopState):
    """The reference loop; `dual` (the subclass's) forwards the block alone, else the block and all to its right."""

    dual = False

    def run(self):
        opts, x, gen, mask_id, lp = self.opts, self.x, self.gen, self.spec.mask_id, self.prompt_len
        check(opts.alg in ("confidence_threshold", "entropy", "maskgit_plus", "topk_margin", "origin"),
              f"unknown alg {opts.alg!r}")
        if opts.block_length is None:
            opts = opts.with_(block_length=min(32, opts.gen_length))
        block, num_blocks, steps = block_plan(opts)
        threshold_mode = opts.alg == "confidence_threshold"
        total = x.shape[1]
        timesteps = torch.linspace(1, opts.eps, steps + 1, device=x.device)
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            logits = shift_logits((yield full_plan(x)).stack())  # refreshes every slot's K/V
            _, x0 = sample_tokens(logits, opts.temperature, opts.top_p, opts.top_k, gen=gen)
            x[:, start] = x0[:, start]
            i = 1
            while True:
                view = x[:, start:end] if self.dual else x[:, start:]
                mask_index = view == mask_id
                logits = shift_logits((yield span_plan(view, start, total, total)).stack())
                if threshold_mode:
                    threshold_step(view, mask_index, logits, opts, block, gen)
                else:
                    if i == steps:
                        break
                    schedule_step(view, mask_index, logits, opts, block, i, steps, timesteps, gen)
                    i += 1
                if not (x[:, start:end] == mask_id).any():
                    break


@register("fast_dllm_dream_prefix", DREAM, "Fast-dLLM Dream prefix cache: block+suffix vs cached prefix",
          FastDllmDreamOptions)
class FastDllmDreamPrefix(_FastDllmDream):
    dual = False


@register("fast_dllm_dream_dual", DREAM, "Fast-dLLM Dream dual cache: the block alone vs all cached K/V",
          FastDllmDreamOptions)
class FastDllmDreamDual(_FastDllmDream):
    dual = True
