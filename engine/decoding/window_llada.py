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

from ..model import LLADA
from .llada import cfg_logits, cfg_plan, cfg_slots
from .options import LladaSampling
from .registry import check, register
from .sampling import argmax, chosen_probability, gumbel_perturb, llada_schedule, random_confidence, top_k_select
from .step import LoopState, StepPlan, StepResult, full_plan, segment

DEFAULT_PERIOD = 5  # the reference's window_size default: the refresh period when refresh_cycle is not given


@dataclass(frozen=True)
class WindowLladaOptions(LladaSampling):
    cfg_scale: float = 0.0  # only with refresh_cycle 1 (every step a full refresh)
    refresh_cycle: int | None = None  # steps per phase (None: window_size)
    window_size: int | None = None  # the reference's name for the period when refresh_cycle is None (None: 5)
    window_tokens: int = 64  # outer window, counted in masks (fixed for a phase)
    active_tokens: int = 8  # active window, counted in masks (recomputed every step)


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


def _propose(logits: torch.Tensor, opts: WindowLladaOptions, gen,
             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, L, V] logits -> candidate tokens and their confidence, both [1, L], with the reference's draws:
    Gumbel noise over all L rows first, then (random remasking) one uniform per row. The softmax confidence is
    computed at `rows` (the masked ones) only, -inf elsewhere."""
    x0 = argmax(gumbel_perturb(logits, opts.temperature, gen))
    if opts.remasking == "low_confidence":
        return x0, chosen_probability(logits, x0, rows)  # in the logits' dtype, unlike Fast-dLLM's float64
    return x0, random_confidence((x0.shape[0], x0.shape[1]), gen, x0.device)


def _refresh_plan(x: torch.Tensor, prompt_index: torch.Tensor, opts: WindowLladaOptions, mask_id: int) -> StepPlan:
    """A full forward of the canvas (rebuilding every cached K/V), with its guidance twin under cfg_scale."""
    return cfg_plan(x, prompt_index, mask_id, refresh=True) if opts.cfg_scale > 0 else full_plan(x, refresh=True)


def _refresh_commit(x: torch.Tensor, result: StepResult, mask_id: int, count: int, opts: WindowLladaOptions,
                    gen) -> torch.Tensor:
    """One vanilla LLaDA step's commit over the whole canvas; returns bool [N], what it committed.
    The cache keeps the K/V of the committed positions as computed from the mask token."""
    mask_index = x == mask_id
    logits = cfg_logits(result, opts.cfg_scale) if opts.cfg_scale > 0 else result.stack()  # [1, N, V]
    x0, conf = _propose(logits, opts, gen, mask_index)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, conf, -np.inf)
    chosen = top_k_select(confidence, [count])  # over the whole canvas: far-field masks can be committed
    x[chosen] = x0[chosen]
    return chosen[0]


def _pruned_plan(x: torch.Tensor, win: LladaWindow) -> StepPlan:
    """The active tokens, their K/V written to their own slots, attending to the window's cached K/V."""
    # The reference's pruned path rotates q/k in the working dtype where its refresh path (and our default)
    # rotates in float32; the two differ only in float64 runs.
    return StepPlan([segment(x[0, win.active], win.active.numpy(), win.window.numpy(), 0, x.shape[1],
                             rope_full_precision=False)])


def _pruned_commit(x: torch.Tensor, win: LladaWindow, result: StepResult, mask_id: int, count: int,
                   opts: WindowLladaOptions, gen) -> None:
    """Commit the top `count` active masks and slide the active set."""
    ids = x[:, win.active]  # [1, n_active]
    x0, conf = _propose(result.stack(), opts, gen, ids == mask_id)  # logits [1, n_active, V]
    confidence = torch.where(ids == mask_id, conf, -np.inf)
    # No "still masked" guard, as in the reference: were count above the active masks, a -inf (decoded) entry
    # would be chosen and overwritten with its new argmax.
    chosen = top_k_select(confidence, [count])[0]
    pos = win.active[chosen]
    x[0, pos] = x0[0, chosen]
    win.after_pruned(x[0], mask_id, pos, opts.active_tokens)


def _validate(x: torch.Tensor, opts: WindowLladaOptions, period: int, steps: int) -> None:
    check(x.shape[0] == 1, "window_llada decodes one sequence at a time (the reference is batch-1 only)")
    check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
    check(steps > 0 and opts.gen_length > 0, "steps and gen_length must be positive")
    check(period > 0, "refresh_cycle (or window_size) must be positive")
    check(opts.window_tokens > 0 and opts.active_tokens > 0, "window_tokens and active_tokens must be positive")
    # The reference crashes on the first pruned step with guidance; only all-refresh runs are defined.
    check(opts.cfg_scale == 0 or period == 1 or steps == 1, "window_llada supports cfg_scale only with refresh_cycle 1")


@register("window_llada", LLADA, "Window-Diffusion LLaDA: periodic full refresh, pruned steps over an active window",
          WindowLladaOptions)
class WindowLlada(LoopState):
    slots_needed = staticmethod(cfg_slots)  # guidance's prompt-masked twin gets slots of its own

    def run(self):
        opts, x, gen, mask_id = self.opts, self.x, self.gen, self.spec.mask_id
        steps = opts.n_steps
        period = opts.refresh_cycle if opts.refresh_cycle is not None else (
            opts.window_size if opts.window_size is not None else DEFAULT_PERIOD)
        _validate(x, opts, period, steps)
        prompt_index = x != mask_id
        counts = llada_schedule(x == mask_id, steps)[0].tolist()  # one block: the schedule spans the generation
        clock, win = PhaseClock(period), None
        for i in range(steps):
            if clock.refresh_due:
                result = yield _refresh_plan(x, prompt_index, opts, mask_id)
                committed = _refresh_commit(x, result, mask_id, counts[i], opts, gen)
                win = LladaWindow.after_refresh(x[0], mask_id, committed, opts.window_tokens, opts.active_tokens)
            else:
                result = yield _pruned_plan(x, win)
                _pruned_commit(x, win, result, mask_id, counts[i], opts, gen)
            clock.advance()
