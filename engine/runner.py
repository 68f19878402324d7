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

    def _pack(self, work) -> tuple[ForwardBatch, list[int]]:
        keys = [torch.arange(dec.x.shape[0]) if plan.keys is None else plan.keys for dec, _, plan in work]
        counts = [len(plan.candidates) for _, _, plan in work]
        if not self.pack or len({len(plan.positions) for _, _, plan in work}) == 1:
            return self._pack_padded(work, keys), counts
        return self._pack_ragged(work, keys), counts

    def _pack_padded(self, work, keys) -> ForwardBatch:
        """[B, T] rows, padded to the longest plan (no padding at all when every plan has T rows)."""
        dev = self.model.device
        B = len(work)
        T = max(len(plan.positions) for _, _, plan in work)
        K = max(len(k) for k in keys)
        R = max(1, max(len(plan.candidates) for _, _, plan in work))
        scratch = self.pool.scratch
        ids = torch.full((B, T), self.model.spec.mask_id, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        slots = torch.full((B, T), scratch, dtype=torch.long)
        key_slots = torch.full((B, K), scratch, dtype=torch.long)
        visible = torch.zeros((B, K), dtype=torch.bool)
        rows = torch.zeros((B, R), dtype=torch.long)
        for b, ((dec, handle, plan), kk) in enumerate(zip(work, keys)):
            t, k, r = len(plan.positions), len(kk), len(plan.candidates)
            ids[b, :t] = dec.x[plan.positions]
            pos[b, :t] = plan.positions
            slots[b, :t] = handle.slots(plan.positions)
            key_slots[b, :k] = handle.slots(kk)
            visible[b, :k] = True
            rows[b, :r] = plan.candidates
        # Only a ragged key set needs a mask; without one SDPA takes the same path a lone request takes.
        mask = None if bool(visible.all()) else visible[:, None, None, :].expand(B, 1, T, K).to(dev)
        return ForwardBatch(ids=ids.to(dev), positions=pos.to(dev), cache=self.view, keys=key_slots.to(dev),
                            attn_mask=mask, logits_rows=rows.to(dev), slots=slots.to(dev))

    def _pack_ragged(self, work, keys) -> ForwardBatch:
        """The real rows back to back ([1, N]); requests sorted by row count and split into attention groups."""
        dev = self.model.device
        lens = [len(plan.positions) for _, _, plan in work]
        order = sorted(range(len(work)), key=lens.__getitem__)
        start, n = [0] * len(work), 0  # each request's first packed row
        for b in order:
            start[b], n = n, n + lens[b]
        ids = torch.cat([work[b][0].x[work[b][2].positions] for b in order])
        pos = torch.cat([work[b][2].positions for b in order])
        slots = torch.cat([work[b][1].slots(work[b][2].positions) for b in order])
        spans = attention_groups([lens[b] for b in order], self.group_cost)
        groups = [self._group(work, keys, order[i:j], start, dev) for i, j in spans]
        R = max(1, max(len(plan.candidates) for _, _, plan in work))
        rows = torch.zeros((len(work), R), dtype=torch.long)
        for b, (_, _, plan) in enumerate(work):
            rows[b, :len(plan.candidates)] = plan.candidates + start[b]
        ragged = Ragged(slots=slots.to(dev), groups=groups, logits_rows=rows.to(dev))
        return ForwardBatch(ids=ids[None].to(dev), positions=pos[None].to(dev), cache=self.view, ragged=ragged)

    def _group(self, work, keys, members: list[int], start: list[int], dev) -> AttnGroup:
        t = torch.tensor([len(work[b][2].positions) for b in members])  # [b]
        k = torch.tensor([len(keys[b]) for b in members])
        T, K = int(t.max()), int(k.max())
        key_slots = torch.full((len(members), K), self.pool.scratch, dtype=torch.long)
        for j, b in enumerate(members):
            key_slots[j, :len(keys[b])] = work[b][1].slots(keys[b])
        visible = torch.arange(K)[None] < k[:, None]  # [b, K]
        mask = None if bool(visible.all()) else visible[:, None, None, :].expand(-1, 1, T, K).to(dev)
        real = torch.arange(T)[None] < t[:, None]  # [b, T]
        rows = None if bool(real.all()) else real.reshape(-1).nonzero()[:, 0].to(dev)
        n0 = start[members[0]]
        return AttnGroup(n0=n0, n1=n0 + int(t.sum()), T=T, keys=key_slots.to(dev), mask=mask, rows=rows)


GROUP_COST_ROWS = 48  # one more attention call costs about what this many padded query rows do (bench.layout)


def attention_groups(lens: list[int], cost: int = GROUP_COST_ROWS) -> list[tuple[int, int]]:
    """Row counts in ascending order -> [i, j) ranges to attend as one padded call each, minimising
    sum(cost + (j - i) * lens[j - 1]) (a group pads to its longest, its last). Exact, over the distinct counts
    (few: active steps and refresh steps)."""
    ends = [j for j in range(1, len(lens) + 1) if j == len(lens) or lens[j] != lens[j - 1]]  # runs of equal counts
    best, cut = [0.0], [0]  # best[e]: cost of the first ends[e-1] requests; cut[e]: where its last group starts
    for e, j in enumerate(ends, 1):
        options = [(best[d] + cost + (j - i) * lens[j - 1], d) for d, i in enumerate([0] + ends[:e - 1])]
        cost, d = min(options)
        best.append(cost)
        cut.append(d)
    out, e = [], len(ends)
    while e:
        i = 0 if cut[e] == 0 else ends[cut[e] - 1]
        out.append((i, ends[e - 1]))
        e = cut[e]
    return out[::-1]
