"""LLaDA's masked-diffusion objective.

Per sequence draw t ~ U(eps, 1); mask each token of the loss region (the whole sequence in pre-training, only the
answer for prompt/answer data) with probability t; cross-entropy on the masked tokens, each weighted by 1/t, summed
and divided by the number of loss-region tokens. This is an upper bound on the negative log-likelihood (the ELBO
that `elbo()` estimates for evaluation).

Dream-layout models (shifted logits) predict position p from output row p - 1, as they decode: the loss reads that
row (`aligned`), so a model trained here decodes with the engine's Dream methods unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffuserve.engine.decoding.sampling import shift_logits
from diffuserve.engine.model import DiffusionLM, ForwardBatch


def aligned(model: DiffusionLM, rows: torch.Tensor) -> torch.Tensor:
    """Output rows [B, L, X] -> row p holding the prediction for position p (Dream: output row p - 1)."""
    return shift_logits(rows) if model.spec.shifted_logits else rows


def corrupt(ids: torch.Tensor, region: torch.Tensor, mask_id: int, gen: torch.Generator, eps: float = 1e-3,
            t: torch.Tensor | None = None, floor: torch.Tensor | None = None):
    """-> (noisy ids, masked flags, per-token mask probability), all [B, L]. floor [B, L]: a per-token minimum
    mask probability (1 = always masked, e.g. the part of a row right of the block being decoded)."""
    B, L = ids.shape
    if t is None:
        t = torch.rand(B, generator=gen)
    p = ((1 - eps) * t + eps)[:, None].expand(B, L)
    if floor is not None:
        p = torch.maximum(p, floor)
    masked = (torch.rand(B, L, generator=gen) < p) & region
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p


def masked_diffusion_loss(model: DiffusionLM, ids: torch.Tensor, region: torch.Tensor, gen: torch.Generator,
                          floor: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    noisy, masked, p = corrupt(ids, region, model.spec.mask_id, gen, eps, floor=floor)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    h = aligned(model, model.hidden_states(ForwardBatch(ids=noisy, positions=pos)))  # [B, L, H]
    logits = model.lm_head(h[masked])  # [n_masked, V]: unmasked rows never reach the vocabulary projection
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none") / p[masked]
    return ce.sum() / region.sum().clamp(min=1)


@torch.inference_mode()
def elbo(model: DiffusionLM, ids: torch.Tensor, region: torch.Tensor, samples: int = 8, seed: int = 0) -> torch.Tensor:
    """Monte-Carlo estimate of the masked-diffusion NLL bound per region token, per sequence [B] (lower is better).
    Stratified t (one per sample, evenly spaced) keeps the estimate's variance low with few samples."""
    gen = torch.Generator().manual_seed(seed)
    B = ids.shape[0]
    total = torch.zeros(B)
    for k in range(samples):
        t = torch.full((B,), (k + 0.5) / samples)
        noisy, masked, p = corrupt(ids, region, model.spec.mask_id, gen, t=t)
        logits = aligned(model, model.logits(noisy)).float()  # [B, L, V]
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") / p  # [B, L]
        total += (ce * masked).sum(1)
    return total / samples / region.sum(1).clamp(min=1)
