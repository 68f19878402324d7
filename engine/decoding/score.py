"""Prompt scoring: per-token shares of LLaDA's Monte-Carlo ELBO, stepped by the engine like any method.

A diffusion LM has no left-to-right product of token probabilities; its likelihood is estimated as LLaDA's own
evaluation does (the ELBO of the LLaDA paper; its `get_log_likelihood`): for a prompt x of L tokens and a boundary c
(positions before it are given, never masked), each of S samples masks k of the T = L - c scored positions, k drawn
stratified across the samples from one uniform start (the reference's `linspace` scheme), the positions uniformly,
and contributes sum over masked i of log p(x_i | the rest) / (k / T). Their mean estimates log p(x[c:] | x[:c]).

The per-token share of position i is that sum's part for i: (1 / S) * sum over samples masking i of
log p(x_i | ...) / (k / T). The shares of positions >= c add up to the estimate exactly, so a client that sums a
continuation's shares (lm-evaluation-harness's loglikelihood requests) ranks continuations by their part of the
prompt's ELBO. The boundary is `score_from` (default 1: the whole prompt after its first token, as OpenAI's echo
gives the first token no log-probability). Position c - 1 and earlier get None.

After scoring, `gen_length` (0 or 1) tokens are generated greedily in one more forward, which is what an
`echo + logprobs + max_tokens 1` request (lm-eval's) asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import ModelSpec
from .options import DecodeOptions
from .registry import ANY, Method, check
from .step import DecodeState, StepPlan, StepResult, segment


@dataclass(frozen=True)
class ScoreOptions(DecodeOptions):
    gen_length: int = 0  # tokens generated after scoring: 0 or 1
    mc_samples: int = 32  # Monte-Carlo samples of the ELBO (LLaDA's evaluation uses 128)
    samples_per_step: int = 8  # masked copies computed in one engine step (each is a full-prompt forward)
    score_from: int = 1  # the boundary c: positions before it are given


def _validate(opts: ScoreOptions) -> None:
    check(opts.gen_length in (0, 1), "prompt scoring generates at most 1 token (max_tokens 0 or 1)")
    check(opts.temperature == 0, "prompt scoring is deterministic for a seed: temperature must be 0")
    check(1 <= opts.mc_samples <= 1024, "mc_samples must be in 1..1024")
    check(1 <= opts.samples_per_step <= 256, "samples_per_step must be in 1..256")
    check(opts.score_from >= 1, "score_from must be at least 1")


class ScoreState(DecodeState):
    records_logprobs = True

    def __init__(self, spec: ModelSpec, prompt: torch.Tensor, opts: ScoreOptions, gen):
        super().__init__(spec, prompt, opts, gen)
        _validate(opts)
        check(prompt.shape[0] == 1, "prompt scoring takes one sequence per request")
        L = self.prompt_len
        self.c = min(opts.score_from, L)
        self.T = L - self.c  # scored positions
        self.logprobs = torch.zeros(self.x.shape[1])
        self.sum = torch.zeros(L, dtype=torch.float64)  # per position: sum over samples of log p / (k / T)
        self.masked, self.k = self._draw() if self.T else (None, None)
        self.next = 0  # the next sample to compute
        if not self.T:
            self._finish_scoring()

    @classmethod
    def slots_needed(cls, rows: int, canvas: int, opts: ScoreOptions) -> int:
        return max(opts.samples_per_step, 1) * canvas

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, T] which scored positions each sample masks, and [S] how many (stratified from one uniform start)."""
        S, T = self.opts.mc_samples, self.T
        start = torch.randint(1, T + 1, (), generator=self.gen).item()
        k = torch.round(torch.linspace(float(start), start + (S - 1) * (T / S), S)).long()
        k = (k - 1) % T + 1  # [S] in 1..T
        masked = torch.zeros(S, T, dtype=torch.bool)
        for s in range(S):
            masked[s, torch.randperm(T, generator=self.gen)[: k[s]]] = True
        return masked, k

    # -- steps -----------------------------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        if self.prompt_logprobs is None:
            return self._scoring_plan()
        return self._generation_plan()

    def _scoring_plan(self) -> StepPlan:
        L, shift = self.prompt_len, int(self.spec.shifted_logits)
        pos = np.arange(L)
        segs = []
        for j, s in enumerate(range(self.next, min(self.next + self.opts.samples_per_step, self.opts.mc_samples))):
            where = self.c + np.flatnonzero(self.masked[s].numpy())  # masked positions, ascending
            ids = self.x[0, :L].numpy().copy()
            ids[where] = self.spec.mask_id
            # Dream: position p is predicted by output row p - 1 (p >= c >= 1, so the row exists).
            segs.append(segment(ids, pos, pos, base=j * self.x.shape[1], canvas=L, logits_rows=where - shift))
        return StepPlan(segs)

    def _generation_plan(self) -> StepPlan:
        n = self.x.shape[1]
        pos = np.arange(n)
        row = np.array([self.prompt_len - int(self.spec.shifted_logits)])
        return StepPlan([segment(self.x[0], pos, pos, canvas=n, logits_rows=row, greedy=True)])

    def commit(self, plan: StepPlan, result: StepResult) -> None:
        self.forward_calls += 1
        if self.prompt_logprobs is not None:  # the generated token
            x0, _, logprob = result.rows[0].choice
            self.x[0, self.prompt_len] = x0[0]
            self.record(np.array([self.prompt_len]), x0, logprob, result.rows[0].logits)
            self.done = True
            return
        for seg, rows in zip(plan.segments, result.rows):
            s = self.next
            where = seg.logits_rows + int(self.spec.shifted_logits)
            targets = torch.as_tensor(self.x[0, where])
            logp = torch.log_softmax(rows.logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]  # [k]
            self.sum[where] += logp.double() / (self.k[s].item() / self.T)
            self.next += 1
        if self.next == self.opts.mc_samples:
            self._finish_scoring()

    def _finish_scoring(self) -> None:
        shares = (self.sum / max(self.opts.mc_samples, 1)).tolist()
        self.prompt_logprobs = [None] * self.c + shares[self.c:]
        self.info["prompt_logprobs"] = self.prompt_logprobs
        if self.opts.gen_length == 0:
            self.done = True

    def undecoded(self) -> int:
        return int(self.x.shape[1] - self.prompt_len) if not self.done else 0


SCORE = Method("score", ANY, ScoreState, "prompt scoring: per-token shares of the Monte-Carlo ELBO (echo + logprobs)",
               ScoreOptions, validate=_validate)
