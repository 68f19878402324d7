"""ModelRunner: many requests' step plans -> one batched forward over the shared KV pool -> logits per request.

Each running request's decoding state says, per segment, which rows to compute (ids at absolute positions), which
request-local slots they write and attend to, and which rows' logits it will read (`decoding.step.StepPlan`). The
runner translates slots into pool slots through each request's `KVHandle`, lays every segment out in one
`ForwardBatch` (padding rows write to the scratch slot, padded keys are masked out), runs the model once, and
hands each request its segments' logits back (`StepResult`). It also runs the verifier passes of guided diffusion:
it is the one place a model is called.

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

from .decoding.sampling import argmax, sample_rows
from .decoding.step import Rows, Segment, StepPlan, StepResult, Verify, log_prob
from .model import AttnGroup, DiffusionLM, ForwardBatch, Ragged
from .model.causal import keep, load_verifier
from .model.kv_pool import KVHandle, KVPool, PoolView


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
        self.verifiers: dict = {}  # guided diffusion's causal LMs, by name, loaded on first use

    @torch.inference_mode()
    def step(self, work: list[tuple[KVHandle, StepPlan]]) -> tuple[list[StepResult], StepStats]:
        """work: (handle, plan) per request -> a StepResult per request (a Rows per segment of its plan, in order,
        and the verifier's tokens where the plan has a Verify pass)."""
        segs = [_Segment(s, handle.slot_map) for handle, plan in work for s in plan.segments]
        results = [StepResult() for _ in work]
        stats = StepStats(requests=len(work))
        if segs:
            if self.pack:
                logits = self.model.forward(self._pack_ragged(segs))  # [M, V]: every segment's rows, back to back
            else:
                fb, flat = self._pack_padded(segs)
                logits = self.model.forward(fb).flatten(0, 1)[flat]  # [B, R, V] -> [M, V]
            self._ban(logits, segs)
            choices = self._choose(logits, segs)
            if logits.device.type != "cpu":  # the states' canvases and bookkeeping live on the host: one copy
                logits = logits.cpu()
                choices = [tuple(None if t is None else t.cpu() for t in c) for c in choices]
            owners = [i for i, (_, plan) in enumerate(work) for _ in plan.segments]
            m = 0
            for i, s, choice in zip(owners, segs, choices):
                r = len(s.candidates)
                results[i].rows.append(Rows(logits[m:m + r], *choice))
                m += r
                stats.rows += len(s.positions)
                stats.keys += len(s.keys)
                stats.pruned += max(0, s.canvas - max(len(s.keys), len(s.positions)))
        for res, (_, plan) in zip(results, work):
            if plan.verify is not None:
                res.verified = self._verify(plan.verify)
        return results, stats

    def _ban(self, logits: torch.Tensor, segs: list[_Segment]) -> None:
        """Segments' banned tokens (Segment.ban) get a logit no token reaches, in one indexed write for the batch.
        Finite, not -inf: classifier-free guidance subtracts two banned logits, and -inf - -inf is NaN."""
        if not any(s.ban is not None for s in segs):
            return
        starts = np.cumsum([0] + [len(s.candidates) for s in segs[:-1]])
        rows, cols = [], []
        for start, s in zip(starts, segs):
            if s.ban is not None:
                r, ids = s.ban
                rows.append(np.repeat(r + start, len(ids)))  # [r * len(ids)]: each row once per banned id
                cols.append(np.tile(np.asarray(ids, dtype=np.int64), len(r)))
        logits[self._t(np.concatenate(rows)), self._t(np.concatenate(cols))] = BANNED_LOGIT

    def _choose(self, logits: torch.Tensor, segs: list[_Segment]) -> list[tuple]:
        """Per segment: (token [R], its probability [R], log-probability [R]) if it asked (Segment.greedy), else
        Nones; computed in one op over the rows of every segment that asked. The token is the argmax, or for a
        segment with `sample` a draw from softmax(logits / T) with one uniform per row from the request's own
        generator (`sample_rows`): a row's result depends on its logits and its request's draws only, so the
        batched result equals each request's own."""
        counts = [len(s.candidates) for s in segs]
        none = (None, None, None)
        if not any(s.greedy for s in segs):
            return [none] * len(segs)
        ends = np.cumsum(counts)
        rows = logits
        if not all(s.greedy for s in segs):  # only the rows of the segments that asked
            rows = logits[self._t(np.concatenate([np.arange(e - c, e) for e, c, s in zip(ends, counts, segs)
                                                  if s.greedy]))]
        token = argmax(rows)  # [M']
        asked = [(c, s) for c, s in zip(counts, segs) if s.greedy]
        if any(s.sample is not None for _, s in asked):
            self._sample(rows, token, asked)
        prob = torch.gather(F.softmax(rows, dim=-1), -1, token[:, None])[:, 0]  # [M']
        logprob = log_prob(prob)
        out, m = [], 0
        for c, s in zip(counts, segs):
            out.append((token[m:m + c], prob[m:m + c], logprob[m:m + c]) if s.greedy else none)
            m += c if s.greedy else 0
        return out

    def _sample(self, rows: torch.Tensor, token: torch.Tensor, asked: list[tuple[int, _Segment]]) -> None:
        """Overwrite the sampling segments' tokens in `token` [M'] with their draws (rows [M', V])."""
        which, temps, draws, m = [], [], [], 0
        for c, s in asked:
            if s.sample is not None and c:
                temperature, gen = s.sample
                which.append(np.arange(m, m + c))
                temps.append(np.full(c, temperature))
                draws.append(torch.rand(c, dtype=torch.float64, generator=gen,  # [c]
                                        device="cpu" if gen is None else gen.device))
            m += c
        if not which:
            return
        idx = self._t(np.concatenate(which))
        temperature = self._t(np.concatenate(temps))  # [S]
        token[idx] = sample_rows(rows[idx], temperature, torch.cat([d.to(rows.device) for d in draws]))

    def _verify(self, v: Verify) -> torch.Tensor:
        lm = self.verifiers.get(v.model) or self.verifiers.setdefault(v.model, load_verifier(v.model))
        keep(v.cache, v.cached)  # a retried step (_isolate) must not feed the same tokens twice
        return lm.predict(v.cache, v.feed)

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> int:
        """Run the dense layers once at every padded row count up to max_rows, so that no request pays for building
        a matmul kernel of a new shape (see padded_rows); -> how many sizes. Writes only the scratch slot."""
        sizes = sorted({padded_rows(n) for n in range(1, max_rows + 1)})
        for n in sizes:
            zeros = torch.zeros((1, n), dtype=torch.long, device=self.model.device)
            ragged = Ragged(slots=zeros[0] + self.pool.scratch, groups=[], logits_rows=zeros[0], logits_count=n, pad=n)
            self.model.forward(ForwardBatch(ids=zeros + self.model.spec.mask_id, positions=zeros, cache=self.view,
                                            ragged=ragged))
        return len(sizes)

    def _pack_padded(self, segs: list[_Segment]) -> tuple[ForwardBatch, torch.Tensor]:
        """[B, T] rows, padded to the longest segment (no padding at all when every segment has T rows)."""
        B = len(segs)
        T = max(len(p.positions) for p in segs)
        K = max(len(p.keys) for p in segs)
        R = max(1, max(len(p.candidates) for p in segs))
        scratch = self.pool.scratch
        ids = np.full((B, T), self.model.spec.mask_id, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        slots = np.full((B, T), scratch, dtype=np.int64)
        key_slots = np.full((B, K), scratch, dtype=np.int64)
        visible = np.zeros((B, K), dtype=bool)
        rows = np.zeros((B, R), dtype=np.int64)
        for b, p in enumerate(segs):
            t, k, r = len(p.positions), len(p.keys), len(p.candidates)
            ids[b, :t] = p.ids
            pos[b, :t] = p.positions
            slots[b, :t] = p.slots
            key_slots[b, :k] = p.key_slots
            visible[b, :k] = True
            rows[b, :r] = p.candidates
        # Only a ragged key set needs a mask; without one SDPA takes the same path a lone request takes.
        mask = None if visible.all() else self._mask(visible).expand(B, 1, T, K)
        fb = ForwardBatch(ids=self._t(ids), positions=self._t(pos), cache=self.view, keys=self._t(key_slots),
                          attn_mask=mask, logits_rows=self._t(rows), slots=self._t(slots),
                          rope_full_precision=_rope_rule(segs))  # (bench.layout: never "mixed")
        return fb, self._t(np.concatenate([b * R + np.arange(len(p.candidates)) for b, p in enumerate(segs)]))

    def _pack_ragged(self, segs: list[_Segment]) -> ForwardBatch:
        """The real rows back to back ([1, N]); segments sorted by row count and split into attention groups."""
        lens = [len(p.positions) for p in segs]
        order = sorted(range(len(segs)), key=lens.__getitem__)
        start, n = [0] * len(segs), 0  # each segment's first packed row
        for b in order:
            start[b], n = n, n + lens[b]
        pad = padded_rows(n) - n
        ids = np.concatenate([segs[b].ids for b in order] + [np.full(pad, self.model.spec.mask_id)])
        pos = np.concatenate([segs[b].positions for b in order] + [np.zeros(pad, dtype=np.int64)])
        slots = np.concatenate([segs[b].slots for b in order] + [np.full(pad, self.pool.scratch, dtype=np.int64)])
        spans = attention_groups([lens[b] for b in order], self.group_cost)
        groups = [self._group([segs[b] for b in order[i:j]], start[order[i]]) for i, j in spans]
        # Logits rows back to back in segment order; lm_head's row count is padded too.
        wanted = np.concatenate([p.candidates + start[b] for b, p in enumerate(segs)])
        rows = np.zeros(padded_rows(max(1, len(wanted))), dtype=np.int64)
        rows[:len(wanted)] = wanted
        rule = _rope_rule(segs)
        working = None
        if rule == "mixed":  # some segments rotate in the working dtype (a reference's pruned path), others not
            flags = np.concatenate([np.full(lens[b], segs[b].rope_full_precision is False) for b in order]
                                   + [np.zeros(pad, dtype=bool)])
            working, rule = self._t(flags), None
        ragged = Ragged(slots=self._t(slots), groups=groups, logits_rows=self._t(rows), logits_count=len(wanted),
                        pad=pad, rope_working=working)
        return ForwardBatch(ids=self._t(ids[None]), positions=self._t(pos[None]), cache=self.view, ragged=ragged,
                            rope_full_precision=rule)

    def _group(self, members: list[_Segment], n0: int) -> AttnGroup:
        t = np.array([len(p.positions) for p in members])  # [b]
        k = np.array([len(p.keys) for p in members])
        T, K = int(t.max()), int(k.max())
        key_slots = np.full((len(members), K), self.pool.scratch, dtype=np.int64)
        for j, p in enumerate(members):
            key_slots[j, :len(p.keys)] = p.key_slots
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


class _Segment:
    """One segment of a step plan, its request-local slots and keys translated into pool slots."""

    def __init__(self, seg: Segment, slot_map: np.ndarray):
        self.ids, self.positions, self.candidates = seg.ids, seg.positions, seg.logits_rows
        self.slots, self.key_slots = slot_map[seg.slots], slot_map[seg.keys]
        self.keys, self.canvas, self.rope_full_precision = seg.keys, seg.canvas, seg.rope_full_precision
        self.greedy, self.sample, self.ban = seg.greedy, seg.sample, seg.ban


def _rope_rule(segs: list[_Segment]):
    """The one rope_full_precision every segment asks for, or "mixed"."""
    rules = {s.rope_full_precision for s in segs}
    return rules.pop() if len(rules) == 1 else "mixed"


def padded_rows(n: int) -> int:
    """n rounded up to one of 8 sizes per octave (at most 12.5% more rows). oneDNN builds a matmul kernel per shape:
    a row count it has not seen costs ~1.5 ms per linear instead of 70 us (bf16, [n, 256] x [256, 688]), and a
    serving engine's row count changes every step; its kernel cache (1024 shapes) then thrashes."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


BANNED_LOGIT = -1e4  # below any real logit, exp() of it is 0 in every dtype, and it survives /temperature and CFG
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
