"""ModelRunner: many requests' step plans -> one batched forward over the shared KV pool -> logits per request.

Each running request's decoder says which rows to compute (absolute positions), which keys they may see and which
rows' logits it will read (`StepPlan`). The runner translates positions and keys into pool slots through each
request's `KVHandle`, lays the plans out in one `ForwardBatch` (padding rows write to the scratch slot, padded
keys are masked out), runs the model once, and hands each request its own logits back.

Layout, chosen by measurement (docs/benchmarks.md): the real rows of all requests go back to back ([1, N], the
`Ragged` layout): the projections and MLP (almost all the FLOPs) run on them as they are, K/V go straight to
their pool rows, and only attention pads, per group of requests with similar row counts (`attention_groups`).
Padding everything made a batch cost B x its longest plan: one request in its refresh step (a whole window of
rows) padded every other request's few active rows up to that size; one attention call for all still did that
to attention (16 requests, one refreshing 76 rows: 17.3 -> 12.5 ms per forward when it has its own group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .decoding.sampling import argmax
from .model import AttnGroup, DiffusionLM, ForwardBatch, Ragged
from .model.kv_pool import KVHandle, KVPool, PoolView


@dataclass
class Rows:
    """One request's share of a step's output: the logits of its candidate rows and, computed for the whole batch
    at once, each row's greedy token and its probability (what a temperature-0 commit needs; per request these
    were three small ops each, a cost that grew with the batch)."""

    logits: torch.Tensor  # [R, V]
    greedy: torch.Tensor  # [R] argmax token
    prob: torch.Tensor  # [R] its softmax probability, in the logits' dtype
    logprob: torch.Tensor  # [R] float32 log of prob (floored at 1e-30), what the response's logprobs report

    @classmethod
    def of(cls, logits: torch.Tensor) -> Rows:
        """One request's logits [R, V] alone."""
        greedy = argmax(logits)
        prob = torch.gather(F.softmax(logits, dim=-1), -1, greedy[:, None])[:, 0]
        return cls(logits, greedy, prob, log_prob(prob))

    @property
    def choice(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.greedy, self.prob, self.logprob


def log_prob(prob: torch.Tensor) -> torch.Tensor:
    return prob.float().clamp_min(1e-30).log()


@dataclass
class StepStats:
    requests: int = 0
    rows: int = 0  # query rows computed (real, not padding)
    keys: int = 0  # keys attended (real)
    pruned: int = 0  # canvas positions neither computed nor attended (far field)


class ModelRunner:
    def __init__(self, model: DiffusionLM, pool: KVPool, pack: bool = True, group_cost: int | None = None):
        """pack=False: the all-padded layout; group_cost: see attention_groups (both for bench.layout)."""
        self.model, self.pool, self.pack = model, pool, pack
        self.group_cost = GROUP_COST_ROWS if group_cost is None else group_cost
        self.view = PoolView(pool)

    @torch.inference_mode()
    def step(self, work: list[tuple[object, KVHandle, object]]) -> tuple[list[Rows], StepStats]:
        """work: (decoder, handle, plan) per request, where the decoder has a canvas `x` [N] and the plan has
        positions [T], keys [K] or None (the whole canvas) and candidates [R]. -> Rows (logits [R, V]) per request."""
        fb, counts = self._pack(work)
        logits = self.model.forward(fb)  # [B, Rmax, V]
        # A row's softmax does not depend on the other rows: the batched result equals each request's own.
        greedy = argmax(logits)  # [B, Rmax]
        prob = torch.gather(F.softmax(logits, dim=-1), -1, greedy[..., None])[..., 0]  # [B, Rmax]
        logprob = log_prob(prob)
        out = [Rows(logits[b, :r], greedy[b, :r], prob[b, :r], logprob[b, :r]) for b, r in enumerate(counts)]
        stats = StepStats(requests=len(work))
        for dec, _, plan in work:
            n = dec.x.shape[0]
            k = n if plan.keys is None else len(plan.keys)
            stats.rows += len(plan.positions)
            stats.keys += k
            stats.pruned += n - max(k, len(plan.positions))
        return out, stats

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> int:
        """Run the dense layers once at every padded row count up to max_rows, so that no request pays for building
        a matmul kernel of a new shape (see padded_rows); -> how many sizes. Writes only the scratch slot."""
        sizes = sorted({padded_rows(n) for n in range(1, max_rows + 1)})
        for n in sizes:
            zeros = torch.zeros((1, n), dtype=torch.long, device=self.model.device)
            ragged = Ragged(slots=zeros[0] + self.pool.scratch, groups=[], logits_rows=zeros[0], logits_shape=(1, n),
                            pad=n)
            self.model.forward(ForwardBatch(ids=zeros + self.model.spec.mask_id, positions=zeros, cache=self.view,
                                            ragged=ragged))
        return len(sizes)

    def _pack(self, work) -> tuple[ForwardBatch, list[int]]:
        # The layout is assembled in numpy (views of the same memory) and handed to torch once: per request these
        # are a few short gathers, which cost several times more as torch ops.
        plans = [_Plan(dec, handle, plan) for dec, handle, plan in work]
        counts = [len(p.candidates) for p in plans]
        if not self.pack:
            return self._pack_padded(plans), counts
        return self._pack_ragged(plans), counts

    def _pack_padded(self, plans: list[_Plan]) -> ForwardBatch:
        """[B, T] rows, padded to the longest plan (no padding at all when every plan has T rows)."""
        B = len(plans)
        T = max(len(p.positions) for p in plans)
        K = max(len(p.keys) for p in plans)
        R = max(1, max(len(p.candidates) for p in plans))
        scratch = self.pool.scratch
        ids = np.full((B, T), self.model.spec.mask_id, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        slots = np.full((B, T), scratch, dtype=np.int64)
        key_slots = np.full((B, K), scratch, dtype=np.int64)
        visible = np.zeros((B, K), dtype=bool)
        rows = np.zeros((B, R), dtype=np.int64)
        for b, p in enumerate(plans):
            t, k, r = len(p.positions), len(p.keys), len(p.candidates)
            ids[b, :t] = p.x[p.positions]
            pos[b, :t] = p.positions
            slots[b, :t] = p.slot_of[p.positions]
            key_slots[b, :k] = p.slot_of[p.keys]
            visible[b, :k] = True
            rows[b, :r] = p.candidates
        # Only a ragged key set needs a mask; without one SDPA takes the same path a lone request takes.
        mask = None if visible.all() else self._mask(visible).expand(B, 1, T, K)
        return ForwardBatch(ids=self._t(ids), positions=self._t(pos), cache=self.view, keys=self._t(key_slots),
                            attn_mask=mask, logits_rows=self._t(rows), slots=self._t(slots))

    def _pack_ragged(self, plans: list[_Plan]) -> ForwardBatch:
        """The real rows back to back ([1, N]); requests sorted by row count and split into attention groups."""
        lens = [len(p.positions) for p in plans]
        order = sorted(range(len(plans)), key=lens.__getitem__)
        start, n = [0] * len(plans), 0  # each request's first packed row
        for b in order:
            start[b], n = n, n + lens[b]
        pad = padded_rows(n) - n
        ids = np.concatenate([plans[b].x[plans[b].positions] for b in order] + [np.full(pad, self.model.spec.mask_id)])
        pos = np.concatenate([plans[b].positions for b in order] + [np.zeros(pad, dtype=np.int64)])
        slots = np.concatenate([plans[b].slot_of[plans[b].positions] for b in order]
                               + [np.full(pad, self.pool.scratch, dtype=np.int64)])
        spans = attention_groups([lens[b] for b in order], self.group_cost)
        groups = [self._group([plans[b] for b in order[i:j]], start[order[i]]) for i, j in spans]
        B, R = len(plans), max(1, max(len(p.candidates) for p in plans))
        rows = np.zeros(padded_rows(B * R), dtype=np.int64)  # lm_head's row count is padded too
        for b, p in enumerate(plans):
            rows[b * R: b * R + len(p.candidates)] = p.candidates + start[b]
        ragged = Ragged(slots=self._t(slots), groups=groups, logits_rows=self._t(rows), logits_shape=(B, R),
                        pad=pad)
        return ForwardBatch(ids=self._t(ids[None]), positions=self._t(pos[None]), cache=self.view, ragged=ragged)

    def _group(self, members: list[_Plan], n0: int) -> AttnGroup:
        t = np.array([len(p.positions) for p in members])  # [b]
        k = np.array([len(p.keys) for p in members])
        T, K = int(t.max()), int(k.max())
        key_slots = np.full((len(members), K), self.pool.scratch, dtype=np.int64)
        for j, p in enumerate(members):
            key_slots[j, :len(p.keys)] = p.slot_of[p.keys]
        visible = np.arange(K)[None] < k[:, None]  # [b, K]
        mask = None if visible.all() else self._mask(visible).expand(-1, 1, T, K)
        real = np.arange(T)[None] < t[:, None]  # [b, T]
        rows = None if real.all() else self._t(np.flatnonzero(real))
        return AttnGroup(n0=n0, n1=n0 + int(t.sum()), T=T, keys=self._t(key_slots), mask=mask, rows=rows)

    def _mask(self, visible: np.ndarray) -> torch.Tensor:
        """bool [b, K] -> additive [b, 1, 1, K] (0 or -inf) in the model's dtype: SDPA turns a bool mask into this
        itself, in every layer (same result: the batch-invariance and ragged-batch tests compare exactly)."""
        return self._t(np.where(visible, 0.0, -np.inf).astype(np.float32)).to(self.model.dtype)[:, None, None, :]

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.model.device)


class _Plan:
    """One request's step plan as numpy views: canvas, rows, keys, candidates and its pool slot map."""

    def __init__(self, dec, handle: KVHandle, plan):
        self.x = dec.x.numpy()
        self.positions, self.candidates = plan.positions.numpy(), plan.candidates.numpy()
        self.keys = np.arange(len(self.x)) if plan.keys is None else plan.keys.numpy()
        self.slot_of = handle.slot_map


def padded_rows(n: int) -> int:
    """n rounded up to one of 8 sizes per octave (at most 12.5% more rows). oneDNN builds a matmul kernel per shape:
    a row count it has not seen costs ~1.5 ms per linear instead of 70 us (bf16, [n, 256] x [256, 688]), and a
    serving engine's row count changes every step; its kernel cache (1024 shapes) then thrashes."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


GROUP_COST_ROWS = 48  # one more attention call costs about what this many padded query rows do (bench.layout)


def attention_groups(lens: list[int], cost: int = GROUP_COST_ROWS) -> list[tuple[int, int]]:
    """Row counts in ascending order -> [i, j) ranges to attend as one padded call each, minimising
    sum(cost + (j - i) * lens[j - 1]) (a group pads to its longest, its last). Exact, over the distinct counts
    (few: active steps and refresh steps)."""
    ends = [j for j in range(1, len(lens) + 1) if j == len(lens) or lens[j] != lens[j - 1]]  # runs of equal counts
    best, cut = [0.0], [0]  # best[e]: cost of the first ends[e-1] requests; cut[e]: where its last group starts
    for e, j in enumerate(ends, 1):
        options = [(best[d] + cost + (j - i) * lens[j - 1], d) for d, i in enumerate([0] + ends[:e - 1])]
        total, d = min(options)
        best.append(total)
        cut.append(d)
    out, e = [], len(ends)
    while e:
        i = 0 if cut[e] == 0 else ends[cut[e] - 1]
        out.append((i, ends[e - 1]))
        e = cut[e]
    return out[::-1]
