"""The decoding contract: what one request's decoding state asks of an engine step, and what it gets back.

Every method is a `DecodeState` per request, which the engine steps:

    plan() -> StepPlan  --(the runner: every running request's plan in one batched forward)-->  StepResult
    commit(plan, result)  (choose tokens, advance; `done` once the canvas is final)

A `StepPlan` is plain data: one `Segment` per attention sequence (rows to compute, with their ids and absolute
positions, the request-local cache slots their K/V go to, the slots they attend to, and which rows' logits come
back), plus optionally a `Verify` pass of a causal LM (guided diffusion's verifier). Whatever a method needs beyond
one plain forward is said here: classifier-free guidance is a second segment over the prompt-masked canvas in its
own slots; Dream's shifted logits are the rows p - 1; a refresh is a segment over the whole window. Nothing but the
runner calls a model.

Slots are request-local: the runner maps them into the shared KV pool through the request's handle. A state that
decodes B rows of the reference's own batch (the parity cases) gives row b slots [b * N, (b + 1) * N).

`LoopState` turns a reference loop into a state: the loop is a generator that yields each step's plan and is sent
its result (`logits = yield plan`), so the loop reads as the reference does, forward calls in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import torch
import torch.nn.functional as F

from ..model import ModelSpec
from .options import DecodeOptions
from .registry import DecodeResult
from .sampling import argmax


@dataclass
class Segment:
    """One attention sequence of a step (numpy int64 arrays; the runner hands torch each array once)."""

    ids: np.ndarray  # [T] token ids of the rows computed
    positions: np.ndarray  # [T] their absolute positions (RoPE)
    slots: np.ndarray  # [T] request-local cache slots their K/V are written to
    keys: np.ndarray  # [K] request-local slots the rows attend to, in this order (written ones included)
    logits_rows: np.ndarray  # [R] indices into the T rows whose logits come back, in this order
    canvas: int = 0  # positions of the sequence (for the pruned-position count in metrics)
    rope_full_precision: bool | None = None  # None: the family's rule; False: rotate in the working dtype
    # The runner also computes each requested row's greedy token and its probability, for all such segments of the
    # step at once (a temperature-0 commit's three small ops per request cost more than one batched op).
    greedy: bool = False
    # With greedy: (temperature > 0, the request's generator): the token is drawn from softmax(logits / temperature)
    # instead of taken as the argmax, for every such segment of the step at once (`sampling.sample_rows`).
    sample: tuple[float, torch.Generator] | None = None
    # (logits rows [r], token ids): tokens these rows may not choose, their logits set far below any other's. The
    # engine sets it (min_tokens, ignore_eos: no EOS before a position), never the method.
    ban: tuple[np.ndarray, tuple[int, ...]] | None = None


@dataclass
class Verify:
    """A causal LM pass: feed tokens after those in `cache` -> the greedy next token after each fed token."""

    model: str  # the verifier's name (a directory or bundled model), loaded once by the runner
    cache: object  # the request's own causal K/V cache (transformers DynamicCache)
    feed: list[int]
    cached: int  # tokens the cache holds before this pass (the runner crops to it first: a retry is idempotent)


@dataclass
class StepPlan:
    segments: list[Segment] = field(default_factory=list)
    verify: Verify | None = None
    refresh: bool = False  # a refresh step (counted in refresh_calls and the metrics)

    @property
    def rows(self) -> int:
        return sum(len(s.positions) for s in self.segments)


@dataclass
class Rows:
    """One segment's share of a step's output: its requested rows' logits and, computed for the whole batch at once,
    each row's chosen token (the argmax, or a draw with Segment.sample) and its probability (what a commit needs)."""

    logits: torch.Tensor  # [R, V]
    greedy: torch.Tensor | None = None  # [R] argmax token, or the drawn one (segments that asked: Segment.greedy)
    prob: torch.Tensor | None = None  # [R] its softmax probability (at temperature 1), in the logits' dtype
    logprob: torch.Tensor | None = None  # [R] float32 log of prob (floored at 1e-30), what logprobs report

    @classmethod
    def of(cls, logits: torch.Tensor) -> Rows:
        """Logits [R, V] alone."""
        greedy = argmax(logits)
        prob = torch.gather(F.softmax(logits, dim=-1), -1, greedy[:, None])[:, 0]
        return cls(logits, greedy, prob, log_prob(prob))

    @property
    def choice(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.greedy, self.prob, self.logprob


def log_prob(prob: torch.Tensor) -> torch.Tensor:
    return prob.float().clamp_min(1e-30).log()


@dataclass
class StepResult:
    rows: list[Rows] = field(default_factory=list)  # one per segment of the plan, in order
    verified: torch.Tensor | None = None  # [len(feed)] with a Verify pass

    def stack(self) -> torch.Tensor:
        """The segments' logits as [S, R, V] (segments of equal row counts: a reference's batch rows)."""
        return torch.stack([r.logits for r in self.rows])


class DecodeState:
    """One request's decoding. Subclasses set `x` (the canvas, [B, N]: B = 1 but for a reference's own batch),
    `prompt_len`, and implement plan / commit; `done` turns True once the canvas is final."""

    x: torch.Tensor
    prompt_len: int
    done: bool = False
    forward_calls: int = 0
    refresh_calls: int = 0
    logprobs: torch.Tensor | None = None  # [N] log-probability of each committed token, where the method keeps it
    records_logprobs = False  # whether it does (a request asking for logprobs needs it)
    top_k = 0  # alternatives recorded per committed token (top_logprobs); set by want_top
    top_ids: torch.Tensor | None = None  # [N, top_k] the most likely tokens at the step each position settled
    top_lps: torch.Tensor | None = None  # [N, top_k] their log-probabilities
    prompt_logprobs: list[float | None] | None = None  # per prompt token, where the state scores the prompt

    def want_top(self, k: int) -> None:
        """Record the k most likely tokens of each committed position's distribution (at the step it settled)."""
        n = self.x.shape[-1]
        self.top_k = k
        self.top_ids, self.top_lps = torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k)

    def record(self, pos, tokens: torch.Tensor, logprob: torch.Tensor, logits: torch.Tensor) -> None:
        """Committed positions' tokens and log-probabilities ([P]) and, if asked, their alternatives from the
        logits [P, V]; then the token's own value comes from the same log-softmax, so that a greedy token equals its
        first alternative exactly (clients test `logprob == max(top)`)."""
        if self.top_k:
            full = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
            lps, ids = full.topk(self.top_k, dim=-1)  # [P, k] each
            self.top_ids[pos], self.top_lps[pos] = ids, lps
            logprob = full.gather(-1, tokens[:, None])[:, 0]
        self.logprobs[pos] = logprob

    def __init__(self, spec: ModelSpec, prompt: torch.Tensor, opts: DecodeOptions, gen: torch.Generator | None):
        self.spec, self.opts, self.gen = spec, opts, gen
        self.prompt_len = prompt.shape[1]
        self.x = new_canvas(prompt, opts.gen_length, spec.mask_id)  # [B, N]
        self.info: dict = {}

    @classmethod
    def slots_needed(cls, rows: int, canvas: int, opts: DecodeOptions) -> int:
        """Cache slots a state of `rows` canvases of `canvas` positions needs (one per position by default)."""
        return rows * canvas

    def plan(self) -> StepPlan:
        """The next step's plan. Idempotent until commit: a request left out of a step (row budget) or retried
        alone after a failed batch is asked again, or given the same plan twice."""
        raise NotImplementedError

    def commit(self, plan: StepPlan, result: StepResult) -> None:
        raise NotImplementedError

    def undecoded(self) -> int:
        """Masks left on the canvas (the engine's committed-token count is the drop in this)."""
        return int((self.x == self.spec.mask_id).sum())

    def partition(self) -> dict[str, np.ndarray] | None:
        """Methods that split the undecoded positions (window): name -> masked absolute positions (ascending) the
        next step treats that way (active, buffer, far). None: no partition (the live canvas view shows none)."""
        return None

    def canvas(self) -> torch.Tensor:
        """Row 0's generated part as it stands (an early exit may have shortened it)."""
        return self.x[0, self.prompt_len:]

    def result(self) -> DecodeResult:
        return DecodeResult(ids=self.x[:, self.prompt_len:], forward_calls=self.forward_calls,
                            refresh_calls=self.refresh_calls, info=dict(self.info))


class LoopState(DecodeState):
    """A state whose steps are a generator: `run()` yields each step's plan and receives its StepResult."""

    def __init__(self, spec, prompt, opts, gen):
        super().__init__(spec, prompt, opts, gen)
        self._loop = self.run()
        self._next: StepPlan | None = None
        self._resume(None)  # runs up to the first forward: option errors surface here, before any step

    def run(self) -> Generator[StepPlan, StepResult, None]:
        raise NotImplementedError

    def plan(self) -> StepPlan:
        return self._next

    def commit(self, plan: StepPlan, result: StepResult) -> None:
        self.forward_calls += int(bool(plan.segments))
        self.refresh_calls += int(plan.refresh)
        self._resume(result)

    def _resume(self, value: StepResult | None) -> None:
        try:
            self._next = self._loop.send(value)
        except StopIteration:
            self._next, self.done = None, True


# -- plans for the shapes the reference loops forward --------------------------------------------------------------

def new_canvas(prompt: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    """[B, Lp] prompt -> [B, Lp + gen_length] canvas with every generated position MASK."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.cpu()
    return x


def segment(ids: torch.Tensor | np.ndarray, positions: np.ndarray, keys: np.ndarray, base: int = 0,
            canvas: int = 0, logits_rows: np.ndarray | None = None, slots: np.ndarray | None = None,
            rope_full_precision: bool | None = None, greedy: bool = False,
            sample: tuple[float, torch.Generator] | None = None) -> Segment:
    """Rows `ids` at `positions`, written to slots base + positions (or base + `slots`), attending base + keys."""
    ids = ids.numpy() if isinstance(ids, torch.Tensor) else ids
    rows = np.arange(len(positions)) if logits_rows is None else logits_rows
    return Segment(ids=np.array(ids, dtype=np.int64), positions=positions,  # a copy: the canvas moves on
                   slots=base + (positions if slots is None else slots), keys=base + keys, logits_rows=rows,
                   canvas=canvas, rope_full_precision=rope_full_precision, greedy=greedy,
                   sample=sample)


def span_plan(ids: torch.Tensor, start: int, key_len: int, canvas: int, refresh: bool = False,
              logits_rows: list[np.ndarray] | None = None) -> StepPlan:
    """The span [start, start + T) of each batch row of ids [B, T], attending to slots [0, key_len) of its row's
    cache (the rows' own K/V written first): span_forward, per row. logits_rows: per row, default all."""
    pos = np.arange(start, start + ids.shape[1])
    keys = np.arange(key_len)
    return StepPlan([segment(ids[b], pos, keys, b * canvas, canvas, None if logits_rows is None else logits_rows[b])
                     for b in range(ids.shape[0])], refresh=refresh)


def full_plan(x: torch.Tensor, refresh: bool = False, logits_rows: list[np.ndarray] | None = None) -> StepPlan:
    """A full forward of every row of the canvas x [B, N] (a plain model.logits(x), with its K/V cached)."""
    return span_plan(x, 0, x.shape[1], x.shape[1], refresh, logits_rows)
