"""Method `window_dream`: Window-Diffusion's Dream sampler (vhicrgit/Window-Diffusion), token for token.

Steps come in phases of `refresh_cycle`:
 - a refresh step drops the far field (every mask from the `o_win_size`-th on), runs the full network over the
   remaining prefix, rebuilds the cache from it, and commits the prediction for the leftmost mask, whatever its
   confidence (so refresh_cycle = 1 is greedy left-to-right decoding);
 - each pruned step recomputes only the inner window, the span from that leftmost position up to the
   (`i_win_size`+1)-th mask, against the cached K/V of the rest of the prefix, and commits by negative entropy:
   the float32 linspace schedule's count (of all masks left), or one token with `early_stop`.
`slide_window` moves the inner window's end onto the remaining masks each pruned step (its start stays put).
`early_stop` cuts the canvas at the first EOS anywhere (prompt included) and then refreshes every step.
See tests/fixtures/parity/WINDOW.md section 2 for the reference's behaviour, quirks included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import DREAM
from .options import DreamSampling
from .registry import check, register
from .sampling import dream_commit_count, sample_tokens, shift_logits
from .step import LoopState, StepPlan, StepResult, span_plan
from .window_llada import PhaseClock

# The reference hard-codes Dream's <|endoftext|> for early stopping and ignores the config's eos.
DREAM_EOS = 151643
DEFAULT_REFRESH_CYCLE = 4  # diffusion_generate's default


@dataclass(frozen=True)
class WindowDreamOptions(DreamSampling):
    """alg: the reference takes it but always ranks by negative entropy, so only "entropy" is accepted."""

    refresh_cycle: int | None = DEFAULT_REFRESH_CYCLE  # steps per phase (None: 4)
    o_win_size: int = 9  # outer window: the prefix through the (o_win_size - 1)-th mask
    i_win_size: int = 5  # inner window: the first mask up to the (i_win_size + 1)-th mask
    slide_window: bool = False  # pruned steps move the inner window's end with the remaining masks
    early_stop: bool = False  # one commit per pruned step, cut at the first EOS, then refresh every step


def _inner_end(x_row: torch.Tensor, mask_id: int, i_win_size: int) -> int:
    """Position of the (i_win_size+1)-th mask of the [N] canvas, or N when there are fewer masks."""
    masks = (x_row == mask_id).nonzero()[:, 0]
    return int(masks[i_win_size]) if masks.numel() > i_win_size else x_row.shape[0]


@dataclass
class DreamWindow:
    """The canvas partition of one refresh phase (batch row 0: the reference decodes one sequence).

    outer_end (K): refresh steps compute the prefix [0, K); masks from K on are the far field, absent from every
        forward of the phase. K counts the positions kept (decoded ones plus the first o_win_size-1 masks) and
        the prefix of that length is taken, as the reference does, not the set.
    inner_start (s), inner_end (e): the active span [s, e), recomputed every pruned step. s is the leftmost mask
        at the refresh and never moves within the phase; e moves only with slide_window.
    The rest of [0, K) is the buffer: K/V as the refresh step left them.
    """

    outer_end: int
    inner_start: int
    inner_end: int

    @classmethod
    def at_refresh(cls, x_row: torch.Tensor, mask_id: int, o_win_size: int, i_win_size: int) -> "DreamWindow":
        is_mask = x_row == mask_id
        ranks = torch.cumsum(is_mask.long(), dim=0)  # 1-based on masks
        outer_end = int((~is_mask | (ranks < o_win_size)).sum())
        inner_start = int(is_mask.nonzero()[0, 0])
        inner_end = _inner_end(x_row, mask_id, i_win_size)
        # The reference fails with a shape error here (the inner window must lie inside the outer one).
        check(inner_end <= outer_end, f"window_dream: inner window end {inner_end} passes the outer window "
                                      f"end {outer_end}; use i_win_size < o_win_size")
        return cls(outer_end, inner_start, inner_end)

    def slide(self, x_row: torch.Tensor, mask_id: int, i_win_size: int) -> None:
        self.inner_end = _inner_end(x_row, mask_id, i_win_size)

    @property
    def key_len(self) -> int:
        """Pruned queries attend to cache slots [0, max(e, K)) in slot order."""
        return max(self.inner_end, self.outer_end)


def _refresh_plan(x: torch.Tensor, win: DreamWindow) -> StepPlan:
    """Full forward of the outer prefix [0, K), rebuilding the cache from it (nothing from the last phase
    survives past K: no later step attends to a slot past K before rewriting it)."""
    return span_plan(x[:, :win.outer_end], 0, win.outer_end, x.shape[1], refresh=True)


def _refresh_commit(x: torch.Tensor, win: DreamWindow, result: StepResult, opts: WindowDreamOptions, mask_id: int,
                    gen) -> None:
    """Commit the leftmost mask's prediction."""
    K, s, e = win.outer_end, win.inner_start, win.inner_end
    logits = shift_logits(result.stack())  # [1, K, V]
    in_window = torch.zeros(K, dtype=torch.bool, device=x.device)
    in_window[s:e] = x[0, s:e] == mask_id
    # Every masked row of the inner window is sampled (at T > 0 each draws), though only the first is used.
    _, x0 = sample_tokens(logits[0, in_window], opts.temperature, opts.top_p, opts.top_k, neg_entropy=True,
                          gen=gen)
    x[0, s] = x0[0]


def _commit(x: torch.Tensor, win: DreamWindow, in_mask: torch.Tensor, confidence: torch.Tensor,
            x0: torch.Tensor, count: int, opts: WindowDreamOptions, mask_id: int, gen) -> None:
    """Commit `count` slots of [s, e) by confidence (top-k, or sampled with alg_temp). A chosen slot that is not a
    mask gets the mask id back, as in the reference (only reachable when count exceeds the window's masks)."""
    s, e = win.inner_start, win.inner_end
    full = torch.full((1, e - s), -torch.inf, dtype=confidence.dtype, device=x.device)
    full[0, in_mask] = confidence
    if opts.alg_temp is None or opts.alg_temp == 0:
        idx = torch.topk(full, count).indices[0]
    else:
        idx = torch.multinomial(F.softmax(full / opts.alg_temp, dim=-1), count, generator=gen)[0]
    proposal = torch.full((e - s,), mask_id, dtype=x.dtype, device=x.device)
    proposal[in_mask] = x0
    x[0, s + idx] = proposal[idx]


def _pruned_plan(x: torch.Tensor, win: DreamWindow) -> StepPlan:
    """Recompute [s, e) against the cached prefix: rows written to their own slots, attending [0, max(e, K))."""
    # If a slid window passes K, the reference attends to never-written slots K..e-1 (uninitialised memory); we
    # write and attend to those rows' fresh K/V instead. No fixture covers it (the reference's output is undefined).
    return span_plan(x[:, win.inner_start:win.inner_end], win.inner_start, win.key_len, x.shape[1])


def _pruned_commit(x: torch.Tensor, win: DreamWindow, result: StepResult, opts: WindowDreamOptions, count: int,
                   mask_id: int, gen) -> tuple[torch.Tensor, bool]:
    """Commit `count` of the inner window's masks. Returns the canvas, cut after the first EOS under early_stop,
    and whether that EOS check fired (even if the EOS is the last position)."""
    ids = x[:, win.inner_start:win.inner_end]  # [1, e - s]
    logits = shift_logits(result.stack())  # shifted within the slice
    in_mask = ids[0] == mask_id
    confidence, x0 = sample_tokens(logits[0, in_mask], opts.temperature, opts.top_p, opts.top_k,
                                   neg_entropy=True, gen=gen)
    if count <= 0:
        return x, False
    _commit(x, win, in_mask, confidence, x0, count, opts, mask_id, gen)
    if opts.early_stop:
        eos = (x[0] == DREAM_EOS).nonzero()
        if eos.numel() > 0:
            return x[:, : int(eos[0, 0]) + 1], True  # the scan includes the prompt
    return x, False


def _validate(x: torch.Tensor, opts: WindowDreamOptions, period: int) -> None:
    check(x.shape[0] == 1, "window_dream decodes one sequence at a time (the reference is batch-1 only)")
    check(opts.n_steps > 0 and opts.gen_length > 0, "steps and max_new_tokens must be positive")
    check(period > 0, "refresh_cycle must be positive")
    check(opts.i_win_size >= 1 and opts.o_win_size >= 1, "i_win_size and o_win_size must be positive")
    check(opts.alg == "entropy", "window_dream ranks by negative entropy: alg must be 'entropy'")


@register("window_dream", DREAM, "Window-Diffusion Dream: periodic prefix refresh, pruned steps over an inner window",
          WindowDreamOptions)
class WindowDream(LoopState):
    def run(self):
        opts, gen, mask_id = self.opts, self.gen, self.spec.mask_id
        period = opts.refresh_cycle if opts.refresh_cycle is not None else DEFAULT_REFRESH_CYCLE
        _validate(self.x, opts, period)
        steps = opts.n_steps
        timesteps = torch.linspace(1, opts.eps, steps + 1, device=self.x.device)  # float32, as the schedule needs
        clock, win, reach_eos = PhaseClock(period), None, False
        for i in range(steps):
            x = self.x  # early_stop may have cut the canvas after an EOS: the state's canvas is the cut one
            is_mask = x[0] == mask_id
            if not is_mask.any():
                return
            if clock.refresh_due or reach_eos:
                win = DreamWindow.at_refresh(x[0], mask_id, opts.o_win_size, opts.i_win_size)
                _refresh_commit(x, win, (yield _refresh_plan(x, win)), opts, mask_id, gen)
            else:
                if opts.slide_window:
                    win.slide(x[0], mask_id, opts.i_win_size)
                count = 1 if opts.early_stop else dream_commit_count(is_mask.sum(), 1, timesteps[i + 1],
                                                                     timesteps[i], last=i == steps - 1)
                result = yield _pruned_plan(x, win)
                self.x, hit_eos = _pruned_commit(x, win, result, opts, count, mask_id, gen)
                reach_eos = reach_eos or hit_eos  # from now on every step refreshes
            clock.advance()
