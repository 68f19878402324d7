"""ModelRunner: many requests' step plans -> one batched forward over the shared KV pool -> logits per request.

Each running request's decoder says which rows to compute (absolute positions), which keys they may see and which
rows' logits it will read (`StepPlan`). The runner translates positions and keys into pool slots through each
request's `KVHandle`, pads the ragged plans into one `ForwardBatch` (padding rows write to the scratch slot, padded
keys are masked out), runs the model once, and hands each request its own logits back.

Layout, chosen by measurement (docs/benchmarks.md): the dense layers (projections, MLP: almost all the FLOPs) run
on the real rows packed together, and only attention uses the padded [B, T] x [B, K] layout, where padding is
cheap. Padding everything made a batch cost B x its longest plan: one request in its refresh step (a whole
window of rows) padded every other request's few active rows up to that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoding.sampling import argmax
from .model import DiffusionLM, ForwardBatch
from .model.kv_pool import KVHandle, KVPool, PoolView


@dataclass
class Rows:
    """One request's share of a step's output: the logits of its candidate rows and, computed for the whole batch
    at once, each row's greedy token and its probability (what a temperature-0 commit needs; per request these
    were three small ops each, a cost that grew with the batch)."""

    logits: torch.Tensor  # [R, V]
    greedy: torch.Tensor  # [R] argmax token
    prob: torch.Tensor  # [R] its softmax probability, in the logits' dtype

    @classmethod
    def of(cls, logits: torch.Tensor) -> Rows:
        """One request's logits [R, V] alone."""
        greedy = argmax(logits)
        return cls(logits, greedy, torch.gather(F.softmax(logits, dim=-1), -1, greedy[:, None])[:, 0])


@dataclass
class StepStats:
    requests: int = 0
    rows: int = 0  # query rows computed (real, not padding)
    keys: int = 0  # keys attended (real)
    pruned: int = 0  # canvas positions neither computed nor attended (far field)


class ModelRunner:
    def __init__(self, model: DiffusionLM, pool: KVPool, pack: bool = True):
        self.model, self.pool, self.pack = model, pool, pack  # pack=False: the all-padded layout (bench.layout)
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
        out = [Rows(logits[b, :r], greedy[b, :r], prob[b, :r]) for b, r in enumerate(counts)]
        stats = StepStats(requests=len(work))
        for dec, _, plan in work:
            n = dec.x.shape[0]
            k = n if plan.keys is None else len(plan.keys)
            stats.rows += len(plan.positions)
            stats.keys += k
            stats.pruned += n - max(k, len(plan.positions))
        return out, stats

    def _pack(self, work) -> tuple[ForwardBatch, list[int]]:
        dev = self.model.device
        B = len(work)
        keys = [torch.arange(dec.x.shape[0]) if plan.keys is None else plan.keys for dec, _, plan in work]
        T = max(len(plan.positions) for _, _, plan in work)
        K = max(len(k) for k in keys)
        R = max(1, max(len(plan.candidates) for _, _, plan in work))
        scratch = self.pool.scratch
        ids = torch.full((B, T), self.model.spec.mask_id, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        slots = torch.full((B, T), scratch, dtype=torch.long)
        key_slots = torch.full((B, K), scratch, dtype=torch.long)
        visible = torch.zeros((B, K), dtype=torch.bool)
        real = torch.zeros((B, T), dtype=torch.bool)
        rows = torch.zeros((B, R), dtype=torch.long)
        counts = []
        for b, ((dec, handle, plan), kk) in enumerate(zip(work, keys)):
            t, k, r = len(plan.positions), len(kk), len(plan.candidates)
            ids[b, :t] = dec.x[plan.positions]
            pos[b, :t] = plan.positions
            slots[b, :t] = handle.slots(plan.positions)
            key_slots[b, :k] = handle.slots(kk)
            visible[b, :k] = True
            real[b, :t] = True
            rows[b, :r] = plan.candidates
            counts.append(r)
        # Only a ragged key set needs a mask; without one SDPA takes the same path a lone request takes.
        mask = None if bool(visible.all()) else visible[:, None, None, :].expand(B, 1, T, K).to(dev)
        # Ragged rows are packed for the dense layers: a request in its refresh step (the whole window) no longer
        # pads every other request's few active rows up to its size.
        packed = self.pack and not bool(real.all())
        fb = ForwardBatch(ids=ids.to(dev), positions=pos.to(dev), cache=self.view, keys=key_slots.to(dev),
                          attn_mask=mask, logits_rows=rows.to(dev), slots=slots.to(dev),
                          valid=real.to(dev) if packed else None, packed=packed)
        return fb, counts
