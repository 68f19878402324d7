"""Method `dream`: Dream's published diffusion_generate sampler, token for token.

Every step runs a full forward whose logits come back for rows p-1 of the masked positions p (Dream predicts
position p from row p-1: the reference's shift_logits, with the vocabulary projection on the rows it reads only),
and commits int(masks * (1 - s/t)) positions on the float32 linspace(1, eps, steps+1) schedule (all that is left
on the last step), ranked by the `alg` confidence: maskgit_plus (probability), topk_margin (top1 - top2), entropy
(negative entropy), or `origin` (each mask independently with probability 1 - s/t, in random order).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import DREAM
from .options import DreamSampling
from .registry import check, register
from .sampling import dream_commit_count, sample_tokens
from .step import LoopState, StepPlan, full_plan

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def alg_confidence(mask_logits: torch.Tensor, opts: DreamSampling, gen, alg: str | None = None):
    """sample_tokens with the confidence variant `alg` names (default opts.alg)."""
    alg = alg or opts.alg
    return sample_tokens(mask_logits, opts.temperature, opts.top_p, opts.top_k, margin=alg == "topk_margin",
                         neg_entropy=alg == "entropy", gen=gen)


def commit_ranked(x: torch.Tensor, mask_index: torch.Tensor, x0: torch.Tensor, confidence: torch.Tensor,
                  count: int, alg_temp: float | None, gen) -> None:
    """Commit `count` masked positions per row of x (in place): top-k by confidence, or sampled without
    replacement from softmax(confidence / alg_temp). x0/confidence are flat over x[mask_index]."""
    if count <= 0:
        return
    full = torch.full(x.shape, -torch.inf, dtype=confidence.dtype, device=x.device)
    full[mask_index] = confidence
    if alg_temp is None or alg_temp == 0:
        _, idx = torch.topk(full, count)
    else:
        idx = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=count, generator=gen)
    proposal = torch.full_like(x, -1)
    proposal[mask_index] = x0
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(idx)
    x[rows, idx] = proposal[rows, idx]


def _origin_step(x, mask_index, mask_logits, opts, p_transfer, gen, mask_id: int) -> None:
    """`origin`: each mask is revealed independently with probability p_transfer (a draw every step)."""
    x0 = torch.zeros_like(x[mask_index]) + mask_id
    reveal = torch.rand(*x0.shape, generator=gen, device=x.device) < p_transfer
    _, x0[reveal] = sample_tokens(mask_logits[reveal], opts.temperature, opts.top_p, opts.top_k, gen=gen)
    x[mask_index] = x0


def masked_plan(x: torch.Tensor, mask_index: torch.Tensor) -> StepPlan:
    """A full forward of x [B, N] whose logits come back for rows p - 1 of each row's masked positions p (row 0 for
    p = 0): shift_logits(full logits)[mask_index], with the vocabulary projection run on those rows only."""
    rows = [np.maximum(np.flatnonzero(m.numpy()) - 1, 0) for m in mask_index.cpu()]
    return full_plan(x, logits_rows=rows)


@register("dream", DREAM, "Dream reference sampler: full forward per step, linspace schedule, alg confidence",
          DreamSampling)
class Dream(LoopState):
    def run(self):
        opts, x, gen, mask_id = self.opts, self.x, self.gen, self.spec.mask_id
        check(opts.alg in DREAM_ALGS, f"alg must be one of {', '.join(DREAM_ALGS)} for method dream")
        steps = opts.n_steps
        check(steps > 0 and opts.gen_length > 0, "steps and gen_length must be positive")
        timesteps = torch.linspace(1, opts.eps, steps + 1, device=x.device)
        for i in range(steps):
            mask_index = x == mask_id
            result = yield masked_plan(x, mask_index)
            mask_logits = torch.cat([r.logits for r in result.rows])  # [n_masked, V], in mask_index's order
            t, s = timesteps[i], timesteps[i + 1]
            last = i == steps - 1
            if opts.alg == "origin":
                _origin_step(x, mask_index, mask_logits, opts, 1 if last else 1 - s / t, gen, mask_id)
                continue
            confidence, x0 = alg_confidence(mask_logits, opts, gen)
            count = dream_commit_count(mask_index.sum(), mask_index.shape[0], s, t, last)
            commit_ranked(x, mask_index, x0, confidence, count, opts.alg_temp, gen)
