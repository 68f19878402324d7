"""Method `window`: diffuserve's own Window-Diffusion serving mode, for both families (the server's default).

Built from the same parts as the reference `window_llada`, with the changes a server wants:
 - commits only among the active masks (the first A masks), never in the far field, on every step;
 - confidence-threshold parallel decoding (`threshold`; at least one token per step, and one of the first
   FRONTIER masks after `stall_steps` steps in a row that committed none of them) or the integer schedule;
 - early exit: once an EOS is committed and everything left of it is decoded, the rest becomes EOS and it stops;
 - refresh policy `refresh`: "full" recomputes the whole canvas (as the reference), "window" only the prompt,
   the decoded tokens and the first W masks (the far field is pruned even then), "buffer" only the first W masks
   (and tokens committed since their last computation); a phase also ends early when its window has no undecoded
   position left to work on;
 - `span`: the active masks stay within a number of positions of the first mask (the first A masks can reach far
   right once the tokens between them have committed);
 - `stable`: with a threshold, each run of adjacent candidates commits its most confident one once its prediction
   has repeated that many computations in a row (free choices never get sure, but they settle side by side);
 - `fresh`: a committed token is recomputed as itself every step until the refresh ("phase", the reference) or in
   the next step only ("once"): its K/V then stay as computed, like a prefix cache's, which on tiny-task at 1024
   cut query rows per token from 24.8 to 15.5 (and to 7 with buffer refreshes) at the same answers.

Per request the state is a `WindowDecoder` (a `DecodeState`) with an explicit `WindowPhase`; `plan()` says which rows
to compute and which keys they see, `commit()` applies the step. With W and A covering the canvas, R = 1, no
threshold and no early exit, it equals the vanilla `llada` loop (one block) token for token. On Dream (shifted
logits) each candidate mask p is read from row p - 1, which the plan computes alongside; everything else is the
same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from ..model import ModelSpec
from .options import Stepped
from .registry import ANY, check, register
from .sampling import llada_schedule, threshold_select
from .step import DecodeState, StepPlan, StepResult, segment


FRONTIER = 4  # with a threshold, after `stall_steps` steps that commit none of the first FRONTIER masks, the best
# of them commits


class WindowPhase(enum.Enum):
    REFRESH = "refresh"  # next step recomputes the window (or canvas) and rebuilds the KV cache
    PRUNED = "pruned"  # next step computes only the active rows against the cached window
    DONE = "done"


@dataclass(frozen=True)
class WindowOptions(Stepped):
    """Commits rank by confidence among the active masks; no blocks, no classifier-free guidance."""

    threshold: float | None = None  # commit every active mask this confident (None: the integer schedule)
    window_tokens: int = 64  # W: outer window, counted in masks (fixed for a phase)
    active_tokens: int = 8  # A: active masks (recomputed every step)
    refresh_cycle: int = 32  # R: steps per phase (the reference scripts' R)
    # "full": the whole canvas (as the reference); "window": prompt + decoded + W masks; "buffer": the W masks and
    # the tokens committed since their last computation (the prompt's and older decoded tokens' K/V stay frozen)
    refresh: str = "window"
    eos_early_exit: bool = True  # stop once an EOS is committed and everything left of it is decoded
    # A committed token stays active (recomputed, its K/V rewritten) "phase": every step until the next refresh (the
    # reference); "once": in the next step only, then its K/V are kept as they are
    fresh: str = "phase"
    stall_steps: int = 4  # with a threshold: steps without a commit among the first FRONTIER masks before one is forced
    # With a threshold, the commit a step makes when no candidate reaches it: "best": the most confident candidate
    # (Fast-dLLM's rule), "frontier": the most confident of the first FRONTIER masks. With a wide active set "best"
    # commits free choices far right of the decoded text before their neighbours; "frontier" lets sure tokens
    # (punctuation, numbers) settle there first.
    force: str = "best"
    # The active masks are the first A that lie within `span` positions of the first mask (None: the first A, however
    # far right they reach). Masks spread out as sure tokens commit right of a free choice; far from the decoded
    # text the model places even a sure token (a full stop) one position off.
    span: int | None = None
    # With a threshold: in each run of adjacent candidate masks, the most confident one commits even below the
    # threshold once its predicted token has been the same in its last `stable` computations (None: off). A free
    # choice (any word of a category) never becomes sure, but its prediction stops changing once its surroundings
    # are settled; waiting for it buys nothing, and runs split by decoded tokens settle side by side. (The most
    # confident of a run: a slot whose kind is clear goes before a neighbour the model still reads as another kind.)
    stable: int | None = None


def _validate(opts: WindowOptions) -> None:
    check(opts.gen_length > 0 and opts.n_steps > 0, "gen_length and steps must be positive")
    check(opts.refresh in ("full", "window", "buffer"), "refresh must be 'full', 'window' or 'buffer'")
    check(opts.fresh in ("phase", "once"), "fresh must be 'phase' or 'once'")
    check(opts.stall_steps > 0, "stall_steps must be positive")
    check(opts.force in ("best", "frontier"), "force must be 'best' or 'frontier'")
    check(opts.span is None or opts.span > 0, "span must be positive")
    check(opts.stable is None or opts.stable > 1, "stable must be at least 2 (computations in a row)")
    check(opts.threshold is None or 0 < opts.threshold <= 1, "threshold must be in (0, 1]")
    check(min(opts.window_tokens, opts.active_tokens, opts.refresh_cycle) > 0,
          "window_tokens, active_tokens and refresh_cycle must be positive")


@register("window", ANY, "diffuserve's Window-Diffusion serving mode: active/buffer/far-field, threshold, EOS exit",
          WindowOptions, validate=_validate)
class WindowDecoder(DecodeState):
    """One request's Window-Diffusion state: canvas, partitions, phase (its K/V live in the engine's pool)."""

    records_logprobs = True

    def __init__(self, spec: ModelSpec, prompt: torch.Tensor, opts: WindowOptions, gen):
        super().__init__(spec, prompt, opts, gen)
        _validate(opts)
        check(prompt.shape[0] == 1, "the window method decodes one sequence per request")
        self.mask_id, self.eos_id = spec.mask_id, spec.eos_id
        self.shifted = spec.shifted_logits  # Dream: position p is predicted by output row p - 1
        self.targets = np.empty(0, dtype=np.int64)  # the masks the current plan's logits rows predict
        self.xr = self.x[0]  # [N]
        # The per-step bookkeeping (partitions, candidates, the phase) runs on numpy views of the same memory: on
        # vectors this short a torch op costs several times a numpy one, and a step does dozens per request.
        self.xn = self.xr.numpy()
        self.logprobs = torch.zeros(self.xr.shape[0])  # [N] log-probability of each committed token
        steps = opts.n_steps
        self.counts = llada_schedule((self.x == self.mask_id), steps)[0].tolist()
        self.step, self.since_refresh, self.stalled = 0, 0, 0
        self.max_steps = 4 * opts.gen_length  # a bound no schedule reaches: one commit per step at the least
        self.period = opts.refresh_cycle
        self.W, self.A = opts.window_tokens, opts.active_tokens
        self.phase = WindowPhase.REFRESH
        self.window = np.empty(0, dtype=np.int64)  # fixed for a phase: keys of the pruned steps
        self.next_window = self.window  # the window a refresh step computes (before its own commits)
        self.fresh = np.empty(0, dtype=np.int64)  # committed this phase: stay active until the next refresh
        self._masks: np.ndarray | None = None  # masked positions, cached until the canvas changes
        # per position: the token its last computation predicted, and in how many computations in a row (`stable`)
        self.last_pred = np.full(len(self.xn), -1, dtype=np.int64)
        self.streak = np.zeros(len(self.xn), dtype=np.int64)

    @property
    def done(self) -> bool:
        return self.phase is WindowPhase.DONE or self.step >= self.max_steps

    def undecoded(self) -> int:
        return len(self.masks())

    # -- partitions --------------------------------------------------------------------------------------------
    def masks(self) -> np.ndarray:
        """Masked positions, ascending."""
        if self._masks is None:
            self._masks = np.flatnonzero(self.xn == self.mask_id)
        return self._masks

    def _window_now(self) -> np.ndarray:
        """Prompt + decoded + the first W masks: what a window refresh computes and pruned steps attend to."""
        keep = np.ones(len(self.xn), dtype=bool)
        keep[self.masks()[self.W:]] = False  # far field
        return np.flatnonzero(keep)

    def _buffer_now(self) -> np.ndarray:
        """The first W masks and the tokens committed but not yet computed as themselves: what a buffer refresh
        computes (the window's decoded K/V are kept: each was computed once, after its commit)."""
        sel = np.zeros(len(self.xn), dtype=bool)
        sel[self.masks()[: self.W]] = True
        sel[self.fresh] = True
        return np.flatnonzero(sel)

    def _within_span(self, masks: np.ndarray) -> np.ndarray:
        """The masks (ascending) no further than `span` positions right of the first one."""
        if self.opts.span is None or not len(masks):
            return masks
        return masks[: np.searchsorted(masks, masks[0] + self.opts.span)]

    def active(self) -> np.ndarray:
        """First A masks inside the window, plus every position committed this phase (post-decode transient)."""
        in_window = np.zeros(len(self.xn), dtype=bool)
        in_window[self.window] = True
        masks = self.masks()
        active = np.zeros(len(self.xn), dtype=bool)  # (a flag per position beats sorting a union, as for isin)
        active[self._within_span(masks[in_window[masks]][: self.A])] = True
        active[self.fresh] = True
        return np.flatnonzero(active)

    def partition(self) -> dict[str, np.ndarray]:
        """The masks as the next step sees them: active (computed), buffer (in the window: K/V cached, attended)
        and far (beyond the window: neither computed nor attended)."""
        masks = self.masks()
        window = self._window_now() if self.phase is WindowPhase.REFRESH else self.window
        in_window = np.zeros(len(self.xn), dtype=bool)
        in_window[window] = True
        active = np.zeros(len(self.xn), dtype=bool)
        active[self._within_span(masks[in_window[masks]][: self.A])] = True
        return {"active": masks[active[masks]], "buffer": masks[in_window[masks] & ~active[masks]],
                "far": masks[~in_window[masks]]}

    # -- one step ----------------------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        n = len(self.xn)
        refresh = self.phase is WindowPhase.REFRESH
        if refresh:
            # The window is fixed here, before this step's commits: every slot in it gets fresh K/V now.
            self.next_window = self._window_now()
            pos = keys = np.arange(n) if self.opts.refresh == "full" else self.next_window
            if self.opts.refresh == "buffer" and self.step > 0:  # the first step computes the whole window
                pos = self._buffer_now()
        else:
            pos, keys = self.active(), self.window
        # Candidates: rows still masked and among the first A masks (never the far field, never the buffer).
        first = np.zeros(n, dtype=bool)
        first[self._within_span(self.masks()[: self.A])] = True
        self.targets = pos[first[pos]]
        if self.shifted:
            # Row p - 1 predicts p: compute it too. It is in the window (decoded, the prompt, or an earlier mask
            # of the first W), so the pruned step's keys already hold it.
            # (A decoded p - 1 outside the active set gets K/V from this pruned context until the next refresh.
            # A mask at position 0, possible only inside a prompt, is read from row 0, as Dream's shift does.)
            before = np.maximum(self.targets - 1, 0)
            pos = np.union1d(pos, before)
            rows = np.searchsorted(pos, before)
        else:
            rows = np.searchsorted(pos, self.targets)
        sample = (self.opts.temperature, self.gen) if self.opts.temperature > 0 else None
        return StepPlan([segment(self.xn[pos], pos, keys, canvas=n, logits_rows=rows, greedy=True, sample=sample)],
                        refresh=refresh)

    def commit(self, plan: StepPlan, result: StepResult) -> None:
        """The candidates' logits [R, V]: choose, commit, advance the phase. The tokens (argmax, or at a temperature
        a draw from softmax(logits / T)) and their probabilities come from the runner, computed for the whole batch
        at once (a sampled draw on each request's own generator)."""
        was_refresh = self.phase is WindowPhase.REFRESH
        self.forward_calls += 1
        self.refresh_calls += int(was_refresh)
        seg, rows = plan.segments[0], result.rows[0]
        if len(seg.logits_rows):
            x0, conf, logprob = rows.choice
            pick = self._pick(conf, frontier=True, pred=x0)  # indices into the candidates
            pos = self.targets[pick.numpy()]
            self.xr[pos] = x0[pick]
            self._masks = None
            self.record(pos, x0[pick], logprob[pick], rows.logits[pick])
            self.fresh = pos if (was_refresh or self.opts.fresh == "once") else np.concatenate([self.fresh, pos])
        elif self.opts.fresh == "once":
            self.fresh = np.empty(0, dtype=np.int64)  # last step's commits were computed in this one
        if was_refresh:
            self.window = self.next_window
        self.step += 1
        self.since_refresh = 0 if was_refresh else self.since_refresh + 1
        self._advance()

    def _keep_frontier_moving(self, conf: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """With a threshold, some masks are free choices the model is never sure of (any valid word: confidence
        ~0.1), while every step a sure token (punctuation, a number, EOS) enters the active set to its right and is
        the step's one commit. The free masks then sit in the active set to the end of the canvas, one step per
        token, and EOS early exit never fires (tiny-task's sentences: ~1014 steps on every 1024 canvas). So after
        `stall_steps` steps in a row that commit none of the first FRONTIER masks, the most confident of them commits
        too. (Forcing one every step got unsure count digits wrong that a few more steps would have settled.)"""
        front = self._frontier()
        if not front.any() or (chosen & front).any():
            self.stalled = 0
        elif self.stalled + 1 < self.opts.stall_steps:  # an unsure token usually settles as its neighbours commit: wait
            self.stalled += 1
        else:
            chosen = chosen.clone()
            chosen[torch.where(front, conf, -1.0).argmax()] = True
            self.stalled = 0
        return chosen

    def _frontier(self) -> torch.Tensor:
        """-> bool [R]: which candidates are among the first FRONTIER masks."""
        return torch.from_numpy(np.isin(self.targets, self.masks()[:FRONTIER]))

    def _select(self, conf: torch.Tensor) -> torch.Tensor:
        """-> bool [R]: the candidates this step commits."""
        chosen = torch.zeros_like(conf, dtype=torch.bool)
        chosen[self._pick(conf)] = True
        return chosen

    def _pick(self, conf: torch.Tensor, frontier: bool = False, pred: torch.Tensor | None = None) -> torch.Tensor:
        """-> indices of the candidates this step commits (frontier: apply the stalled-frontier rule; pred: the
        candidates' predicted tokens, for the `stable` rule)."""
        if self.opts.threshold is not None:
            if self.opts.force == "best":
                chosen = threshold_select(conf[None], self.opts.threshold)[0]
            else:
                chosen = conf >= self.opts.threshold
            if self.opts.stable is not None and pred is not None:
                settled = self._stable(pred.numpy()) & self._run_best(conf.float().numpy())
                chosen = chosen | torch.from_numpy(settled)
            if frontier:
                chosen = self._keep_frontier_moving(conf, chosen)
            if not chosen.any():  # force "frontier": a step commits at least the best of the first FRONTIER masks
                chosen = chosen.clone()
                chosen[torch.where(self._frontier(), conf, -1.0).argmax()] = True
            return chosen.nonzero()[:, 0]
        # The global schedule; once it is spent (fewer candidates than it asked for earlier), one per step.
        # (torch.topk as top_k_select calls it: the same ties, without the bool mask round trip.)
        k = self.counts[self.step] if self.step < len(self.counts) else 1
        return torch.topk(conf, k=min(k, conf.shape[0])).indices

    def _run_best(self, conf: np.ndarray) -> np.ndarray:
        """conf [R] -> bool [R]: the most confident candidate of each run of adjacent positions (the candidates,
        ascending, split wherever a decoded token lies between two of them)."""
        run = np.concatenate([[0], np.cumsum(np.diff(self.targets) > 1)])  # [R] run index of each candidate
        order = np.lexsort((-conf, run))  # by run, then most confident first
        best = np.zeros(len(conf), dtype=bool)
        best[order[np.concatenate([[True], np.diff(run[order]) > 0])]] = True  # each run's first in that order
        return best

    def _stable(self, pred: np.ndarray) -> np.ndarray:
        """pred [R]: this step's predictions for the candidates -> bool [R]: predicted the same `stable` times in a
        row (counting this one)."""
        t = self.targets
        same = self.last_pred[t] == pred
        self.streak[t] = np.where(same, self.streak[t] + 1, 1)
        self.last_pred[t] = pred
        return self.streak[t] >= self.opts.stable

    def _advance(self) -> None:
        masks = self.masks()
        first = np.searchsorted(masks, self.prompt_len)  # the generated part's first mask (a prompt may hold one)
        if first == len(masks):
            self.phase = WindowPhase.DONE
            return
        if self.opts.eos_early_exit:
            gen_part = self.xn[self.prompt_len:]
            eos = np.flatnonzero(gen_part == self.eos_id)
            if len(eos) and masks[first] > self.prompt_len + eos[0]:  # an EOS with nothing undecoded left of it
                gen_part[eos[0]:] = self.eos_id  # the model fills a canvas's tail with EOS; skip computing it
                self._masks = None
                self.phase = WindowPhase.DONE
                return
        window_masks = bool((self.xn[self.window] == self.mask_id).any()) if len(self.window) else False
        due = self.since_refresh + 1 >= self.period or not window_masks
        self.phase = WindowPhase.REFRESH if due else WindowPhase.PRUNED

