"""Method `window_llada`: Window-Diffusion's LLaDA sampler (vhicrgit/Window-Diffusion), token for token.

The whole generation is one block on the vanilla LLaDA integer schedule. Steps come in phases of R
(`refresh_cycle`, else `window_size`):
 - a refresh step runs the full network over the canvas, rebuilds every cached K/V, and commits the schedule's
   top-k over the whole canvas (far-field masks included), exactly one vanilla LLaDA step;
 - it then fixes the outer window for the phase (the first `window_tokens` masks plus every decoded position)
   and the active set (the first `active_tokens` masks plus the positions it just committed);
 - each pruned step recomputes only the active tokens, writes their K/V into the cache, attends over the
   window's cached K/V, commits the top-k among the active masks, and slides the active set onto the next
   masks, keeping every position committed since the refresh active until the phase ends.
With R = 1 every step is a refresh and the output equals vanilla LLaDA with block_length = gen_length.
See tests/fixtures/parity/WINDOW.md section 1 for the reference's behaviour, quirks included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import LLADA, DiffusionLM, ForwardBatch, KVCache, span_forward
from .llada import guided_logits, new_canvas
from .registry import DecodeOptions, DecodeResult, check, register
from .sampling import argmax, gumbel_perturb, llada_schedule, random_confidence, top_k_select

DEFAULT_PERIOD = 5  # the reference's window_size default: the refresh period when refresh_cycle is not given


@dataclass
class PhaseClock:
    """Where a step falls in its refresh phase: step 0 of every `period` steps is a refresh step."""

    period: int
    step: int = 0

    @property
    def refresh_due(self) -> bool:
        return self.step == 0

    def advance(self) -> None:
        self.step = (self.step + 1) % self.period


def mask_ranks(x_row: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] canvas -> (is_mask [N], 0-based rank of each mask among the masks, left to right; junk elsewhere)."""
    is_mask = x_row == mask_id
    return is_mask, torch.cumsum(is_mask.long(), dim=0) - 1


@dataclass
class LladaWindow:
    """The canvas partition of one refresh phase (batch row 0: the reference decodes one sequence).

    active: LongTensor [n_active], ascending: positions recomputed (fresh queries and K/V) every pruned step.
    window: LongTensor [n_window], ascending: the key positions pruned queries attend to, fixed for the phase.
    recent: bool [N]: positions committed by pruned steps since the refresh; they stay active so that their
            cached K/V get recomputed from the real token until the next refresh.
    Everything else in `window` is the buffer (K/V as last computed); masks outside it are the far field.
    """

    active: torch.Tensor
    window: torch.Tensor
    recent: torch.Tensor

    @classmethod
    def after_refresh(cls, x_row: torch.Tensor, mask_id: int, committed: torch.Tensor, window_tokens: int,
                      active_tokens: int) -> "LladaWindow":
        """Anchor both windows on the canvas as the refresh step left it (`committed`: bool [N], its commits)."""
        is_mask, rank = mask_ranks(x_row, mask_id)
        active = (is_mask & (rank < active_tokens)) | committed
        window = (is_mask & (rank < window_tokens)) | ~is_mask
        return cls(active.nonzero()[:, 0], window.nonzero()[:, 0], torch.zeros_like(is_mask))

    def after_pruned(self, x_row: torch.Tensor, mask_id: int, committed_pos: torch.Tensor,
                     active_tokens: int) -> None:
        """Slide the active set onto the first remaining masks; the outer window stays put until the refresh."""
        self.recent[committed_pos] = True
        is_mask, rank = mask_ranks(x_row, mask_id)
        self.active = ((is_mask & (rank < active_tokens)) | self.recent).nonzero()[:, 0]

    def far_field(self, x_row: torch.Tensor, mask_id: int) -> torch.Tensor:
        """Masks no pruned step sees: LongTensor of positions outside the window that are still masked."""
        outside = torch.ones_like(x_row, dtype=torch.bool)
        outside[self.window] = False
        return (outside & (x_row == mask_id)).nonzero()[:, 0]


def _propose(logits: torch.Tensor, opts: DecodeOptions, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, L, V] logits -> candidate tokens and their confidence, both [1, L], with the reference's draws:
    Gumbel noise over all L rows first, then (random remasking) one uniform per row."""
    x0 = argmax(gumbel_perturb(logits, opts.temperature, gen))
    if opts.remasking == "low_confidence":
        p = F.softmax(logits, dim=-1)  # in the logits' dtype, unlike Fast-dLLM's float64
        return x0, torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, random_confidence((x0.shape[0], x0.shape[1]), gen, x0.device)


def _refresh_step(model: DiffusionLM, x: torch.Tensor, cache: KVCache | None, prompt_index: torch.Tensor,
                  count: int, opts: DecodeOptions, gen) -> torch.Tensor:
    """One vanilla LLaDA step over the whole canvas, rebuilding the cache; returns bool [N], what it committed.
    The cache keeps the K/V of the committed positions as computed from the mask token."""
    mask_index = x == model.spec.mask_id
    if opts.cfg_scale > 0:
        logits = guided_logits(model, x, prompt_index, opts.cfg_scale)
    elif cache is not None:
        logits = span_forward(model, x, 0, cache, x.shape[1])
    else:
        logits = model.logits(x)
    x0, conf = _propose(logits, opts, gen)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, conf, -np.inf)
    chosen = top_k_select(confidence, [count])  # over the whole canvas: far-field masks can be committed
    x[chosen] = x0[chosen]
    return chosen[0]


def _pruned_step(model: DiffusionLM, x: torch.Tensor, plan: LladaWindow, cache: KVCache, mask_id: int,
                 count: int, opts: DecodeOptions, gen) -> None:
    """Recompute the active tokens against the window's cached K/V and commit the top `count` active masks."""
    ids = x[:, plan.active]  # [1, n_active]
    # The reference's pruned path rotates q/k in the working dtype where its refresh path (and our default)
    # rotates in float32; the two differ only in float64 runs.
    fb = ForwardBatch(ids=ids, positions=plan.active[None], cache=cache, keys=plan.window[None],
                      rope_full_precision=False)
    logits = model.forward(fb)  # [1, n_active, V]
    x0, conf = _propose(logits, opts, gen)
    confidence = torch.where(ids == mask_id, conf, -np.inf)
    # No "still masked" guard, as in the reference: were count above the active masks, a -inf (decoded) entry
    # would be chosen and overwritten with its new argmax.
    chosen = top_k_select(confidence, [count])[0]
    pos = plan.active[chosen]
    x[0, pos] = x0[0, chosen]
    plan.after_pruned(x[0], mask_id, pos, opts.active_tokens)


def _validate(prompt: torch.Tensor, opts: DecodeOptions, period: int, steps: int) -> None:
    check(prompt.shape[0] == 1, "window_llada decodes one sequence at a time (the reference is batch-1 only)")
    check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
    check(steps > 0 and opts.gen_length > 0, "steps and gen_length must be positive")
    check(period > 0, "refresh_cycle (or window_size) must be positive")
    check(opts.window_tokens > 0 and opts.active_tokens > 0, "window_tokens and active_tokens must be positive")
    # The reference crashes on the first pruned step with guidance; only all-refresh runs are defined.
    check(opts.cfg_scale == 0 or period == 1 or steps == 1, "window_llada supports cfg_scale only with refresh_cycle 1")


@register("window_llada", LLADA, "Window-Diffusion LLaDA: periodic full refresh, pruned steps over an active window")
def generate(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions,
             gen: torch.Generator | None = None) -> DecodeResult:
    steps = opts.n_steps
    period = opts.refresh_cycle if opts.refresh_cycle is not None else (
        opts.window_size if opts.window_size is not None else DEFAULT_PERIOD)
    _validate(prompt, opts, period, steps)
    mask_id = model.spec.mask_id
    x = new_canvas(prompt, opts.gen_length, mask_id)
    prompt_index = x != mask_id
    counts = llada_schedule(x == mask_id, steps)[0].tolist()  # one block: the schedule spans the generation
    has_pruned = period > 1 and steps > 1
    cache = model.new_cache(1, x.shape[1]) if has_pruned else None
    clock, plan, refreshes = PhaseClock(period), None, 0
    for i in range(steps):
        if clock.refresh_due:
            committed = _refresh_step(model, x, cache, prompt_index, counts[i], opts, gen)
            plan = LladaWindow.after_refresh(x[0], mask_id, committed, opts.window_tokens, opts.active_tokens)
            refreshes += 1
        else:
            _pruned_step(model, x, plan, cache, mask_id, counts[i], opts, gen)
        clock.advance()
    return DecodeResult(ids=x[:, prompt.shape[1]:], forward_calls=steps, refresh_calls=refreshes)
