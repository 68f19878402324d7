"""Methods `streaming_llada`, `streaming_dream`, `streaming_dream_dual`: Streaming-dLLM, token for token.

Streaming-dLLM (xiaoshideta/Streaming-dLLM, see tests/fixtures/parity/STREAMING.md) is Fast-dLLM's block-cached
loop with three changes:
 - suffix pruning: each block's forwards see only the prefix, the block, the first `window_size` positions right of
   the block and the canvas's last position (at its true position id), instead of the whole masked suffix;
 - a dynamic threshold in the cached steps, threshold * (1 - alpha * (1 - r)), where r is the share of masks among
   the forwarded block + kept suffix rows, so the bar drops as the block fills up;
 - an early exit: once a completed block holds an EOS, everything after it becomes EOS and decoding stops.
The prefix K/V come from the block-start forward and stay frozen for the whole block (dual: the kept suffix's too).
Suffix positions are never decoded; only the current block can be written.

Each method is a `LoopState`: every forward is one segment per batch row (`pruned_plan`), rows written to their
position's slot and attending to the pruned sequence's slots in its order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import DREAM, LLADA
from .fast_dllm import FastDllmOptions
from .fast_dllm import transfer as fast_dllm_transfer
from .fast_dllm_dream import FastDllmDreamOptions, schedule_step
from .llada import block_plan
from .registry import check, register
from .sampling import argmax, chosen_probability, gumbel_perturb, llada_schedule, sample_tokens, shift_logits
from .step import LoopState, StepPlan, segment

DEFAULT_WINDOW = 32  # both references' window_size default (used when opts.window_size is None)
DEFAULT_DREAM_BLOCK = 32  # Dream's block_length default
LLADA_ALPHA, DREAM_ALPHA = 0.3, 0.9  # the references' confidence_alpha defaults differ by family


@dataclass(frozen=True)
class StreamingLladaOptions(FastDllmOptions):
    window_size: int | None = DEFAULT_WINDOW  # kept suffix positions right of the block (None: 32)
    confidence_alpha: float | None = LLADA_ALPHA  # dynamic-threshold strength (None: 0.3)
    eos_id: int | None = None  # the early-exit token (None: the checkpoint's EOS)


@dataclass(frozen=True)
class StreamingDreamOptions(FastDllmDreamOptions):
    window_size: int | None = DEFAULT_WINDOW
    confidence_alpha: float | None = DREAM_ALPHA  # (None: 0.9)
    eos_id: int | None = None  # the reference's `eos`


def kept_positions(end: int, total: int, window: int) -> np.ndarray:
    """Forwarded position ids for a block ending at `end` on a canvas of `total`: [0, end) ++ kept suffix.

    Kept suffix: all of [end, total) if it fits in `window`, else its first `window` positions plus the last one."""
    if total - end <= window:
        return np.arange(total, dtype=np.int64)
    return np.concatenate([np.arange(end + window, dtype=np.int64), np.array([total - 1], dtype=np.int64)])


def pruned_plan(ids: torch.Tensor, positions: np.ndarray, keys: np.ndarray, canvas: int) -> StepPlan:
    """ids [B, T] at `positions` [T] (K/V to the positions' slots), attending to slots `keys` [K] in that order.

    The key order matters for float rounding: it is the pruned sequence's order (prefix, block, window, tail).
    Row b of the reference's batch is its own segment in slots [b * canvas, (b + 1) * canvas)."""
    return StepPlan([segment(ids[b], positions, keys, base=b * canvas, canvas=canvas) for b in range(ids.shape[0])])


def dynamic_threshold(threshold: float, mask_ratio: float, alpha: float) -> float:
    """The references' context-aware threshold, in Python floats with their operation order."""
    return threshold * (1.0 - alpha * (1 - mask_ratio))


def _window(opts: StreamingLladaOptions | StreamingDreamOptions) -> int:
    window = DEFAULT_WINDOW if opts.window_size is None else opts.window_size
    check(window >= 0, "window_size must be >= 0")
    return window


# ----------------------------------------------------------------------------------------------------------------
# LLaDA: generate_with_prefix_cache


def llada_transfer(logits, opts: StreamingLladaOptions, mask_index, x, quota, threshold: float | None, gen):
    """Streaming's get_transfer_index: (proposed tokens, bool commit mask), both like `x` [B, L].

    threshold set: candidates reaching it, plus each row's best forced on; else the `quota` [B] best per row.
    Differs from Fast-dLLM's rule in RNG (float64 random scores) and tie handling (finfo.min, descending sort)."""
    if opts.factor is not None:  # the factor rule is Fast-dLLM's own, threshold ignored
        return fast_dllm_transfer(logits, opts.with_(threshold=None), mask_index, x, None, gen)
    x0 = argmax(gumbel_perturb(logits, opts.temperature, gen))
    if opts.remasking == "low_confidence":
        conf = chosen_probability(logits, x0, mask_index, torch.float64)
    else:
        conf = torch.rand(x0.shape, dtype=torch.float64, generator=gen, device=x0.device)
    x0 = torch.where(mask_index, x0, x)
    lowest = torch.tensor(torch.finfo(conf.dtype).min, dtype=conf.dtype, device=conf.device)
    confidence = torch.where(mask_index, conf, lowest)
    if threshold is not None:
        chosen = mask_index & (confidence >= threshold)
        chosen.scatter_(1, torch.argmax(confidence, dim=1, keepdim=True), True)
        return x0, chosen & mask_index
    order = torch.sort(confidence, dim=1, descending=True).indices  # not topk: tie order must match the reference
    cols = torch.arange(x.shape[1], device=x.device).expand_as(order)
    take = cols < quota.clamp(min=0).unsqueeze(1)  # [B, L] first quota[b] ranks
    chosen = torch.zeros_like(mask_index).scatter(1, order, take)
    return x0, chosen & mask_index


@register("streaming_llada", LLADA, "Streaming-dLLM: pruned suffix, dynamic threshold, prefix cache, EOS exit",
          StreamingLladaOptions)
class StreamingLlada(LoopState):
    def run(self):
        opts = self.opts
        check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
        block, num_blocks, steps = block_plan(opts)
        window = _window(opts)
        mask_id, x, lp = self.spec.mask_id, self.x, self.prompt_len
        eos = self.spec.eos_id if opts.eos_id is None else opts.eos_id
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            quota = llada_schedule(x[:, start:end] == mask_id, steps)
            pos = kept_positions(end, x.shape[1], window)
            yield from self._block_start(pos, end, quota)
            i = 1
            while True:
                # Tested before each cached step: a block finished by its full forward costs one call.
                if not (x[:, start:end] == mask_id).any():
                    if (x[:, start:end] == eos).any():
                        x[:, end:] = eos
                        return
                    break
                # The quotas empty the block within `steps` steps, so i < steps here; min() only guards the index.
                yield from self._cached_step(pos, start, block, quota[:, min(i, steps - 1)])
                i += 1

    def _block_start(self, pos: np.ndarray, end: int, quota):
        """Full forward on the pruned canvas; commits over the block with the plain threshold (or quota[:, 0])."""
        view = self.x[:, : len(pos)]  # reference quirk: the first len(pos) canvas entries, not x[:, pos] (all masks)
        logits = (yield pruned_plan(view, pos, pos, self.x.shape[1])).stack()
        mask_index = view == self.spec.mask_id
        mask_index[:, end:] = False
        x0, chosen = llada_transfer(logits, self.opts, mask_index, view, quota[:, 0], self.opts.threshold, self.gen)
        view[chosen] = x0[chosen]

    def _cached_step(self, pos: np.ndarray, start: int, block: int, count):
        """One step on block + kept suffix against the frozen prefix cache, with the dynamic threshold."""
        opts, gen = self.opts, self.gen
        view = self.x[:, start: len(pos)]  # [B, block + kept]
        mask_index = view == self.spec.mask_id
        # Kept suffix slots are masks and count; rows are summed but the width is not (r can exceed 1 for B > 1).
        ratio = mask_index.sum().item() / view.shape[1]
        mask_index[:, block:] = False
        logits = (yield pruned_plan(view, pos[start:], pos, self.x.shape[1])).stack()
        gumbel_perturb(logits, opts.temperature, gen)  # the reference draws (and discards) noise here
        alpha = LLADA_ALPHA if opts.confidence_alpha is None else opts.confidence_alpha
        thr = None if opts.threshold is None else dynamic_threshold(opts.threshold, ratio, alpha)
        x0, chosen = llada_transfer(logits, opts, mask_index, view, count, thr, gen)
        view[chosen] = x0[chosen]


# ----------------------------------------------------------------------------------------------------------------
# Dream: diffusion_generate / _sample of generation_utils_block.py


def _dream_threshold_step(view, mask_index, logits, opts, block: int, width: int, alpha: float, mask_id: int,
                          gen) -> None:
    """Commit the best block mask and every other one reaching the dynamic threshold (row 0 only, as the reference).

    view/mask_index [1, width'] are the forwarded rows (block + kept suffix, or the block alone in dual mode);
    `width` is block + kept suffix in both modes, so dual's ratio counts block masks over the wider denominator."""
    # Every masked row is sampled, kept suffix slots included: at T > 0 each costs a categorical draw.
    confidence, x0 = sample_tokens(logits[mask_index], opts.temperature, opts.top_p, opts.top_k, gen=gen)
    full = torch.full(view.shape, -torch.inf, dtype=logits.dtype, device=view.device)
    full[mask_index] = confidence
    full[:, block:] = -torch.inf  # suffix slots never commit
    proposal = torch.full_like(view, mask_id)
    proposal[mask_index] = x0
    n = int((view[:, :block] == mask_id).sum())
    if n == 0:
        return
    vals, idx = torch.topk(full, n)
    thr = dynamic_threshold(0.9 if opts.threshold is None else opts.threshold,
                            mask_index.sum().item() / width, alpha)
    keep = ~(vals[0] < thr)  # the reference drops ranks below thr, so ">=" (and NaN) keeps
    keep[0] = True  # the best one always commits
    chosen = torch.zeros_like(mask_index)
    chosen[0, idx[0][keep]] = True
    view[chosen] = proposal[chosen]


@register("streaming_dream", DREAM, "Streaming-dLLM Dream: pruned suffix, dynamic threshold, prefix cache, EOS exit",
          StreamingDreamOptions)
class StreamingDream(LoopState):
    dual = False  # dual cache: cached steps forward the block alone, the kept suffix's K/V frozen too

    def run(self):
        opts, x = self.opts, self.x
        check(opts.alg in ("confidence_threshold", "entropy", "maskgit_plus", "topk_margin", "origin"),
              f"unknown alg {opts.alg!r}")
        check(opts.alg != "confidence_threshold" or x.shape[0] == 1,
              "alg confidence_threshold decodes one request at a time (the reference updates row 0 only)")
        if opts.block_length is None:
            self.opts = opts = opts.with_(block_length=min(DEFAULT_DREAM_BLOCK, opts.gen_length))
        block, num_blocks, steps = block_plan(opts)
        _window(opts)  # validate before any forward
        lp = self.prompt_len
        eos = self.spec.eos_id if opts.eos_id is None else opts.eos_id
        timesteps = torch.linspace(1, opts.eps, steps + 1, device=x.device)
        for b in range(num_blocks):
            start, end = lp + b * block, lp + (b + 1) * block
            completed = yield from self._block(start, end, steps, timesteps)
            # Tested right after the update that completes the block; a block left partial never exits.
            if completed and (x[:, start:end] == eos).any():
                x[:, end:] = eos
                return

    def _block(self, start: int, end: int, steps: int, timesteps):
        """Decode one block -> completed. It stays partly masked with one step per block."""
        opts, x, gen, mask_id, block = self.opts, self.x, self.gen, self.spec.mask_id, end - start
        pos = kept_positions(end, x.shape[1], _window(opts))
        alpha = DREAM_ALPHA if opts.confidence_alpha is None else opts.confidence_alpha
        view = x[:, : len(pos)]  # reference quirk: the first len(pos) canvas entries (the kept ones are all masks)
        logits = shift_logits((yield pruned_plan(view, pos, pos, x.shape[1])).stack())
        # Every pruned position is sampled (RNG at T > 0) but only the block's first one is written, unconditionally.
        _, x1 = sample_tokens(logits, opts.temperature, opts.top_p, opts.top_k, gen=gen)
        x[:, start] = x1[:, start]
        i = 1
        q_end = end if self.dual else len(pos)
        while True:
            view = x[:, start:q_end]  # [B, block] dual, [B, block + kept] prefix
            mask_index = view == mask_id
            # Dual: the block's K/V overwrite their slots; the kept suffix's stay from the block-start forward.
            logits = shift_logits((yield pruned_plan(view, pos[start:q_end], pos, x.shape[1])).stack())
            if opts.alg == "confidence_threshold":
                _dream_threshold_step(view, mask_index, logits, opts, block, len(pos) - start, alpha, mask_id, gen)
            else:
                if i == steps:  # only reachable with one step per block: the forward is spent, the block left partial
                    return False
                schedule_step(view, mask_index, logits, opts, block, i, steps, timesteps, gen)
            i += 1
            if not (x[:, start:end] == mask_id).any():
                return True


@register("streaming_dream_dual", DREAM, "Streaming-dLLM Dream, dual cache: the block alone vs prefix + kept suffix",
          StreamingDreamOptions)
class StreamingDreamDual(StreamingDream):
    dual = True
