"""Token choice, confidence and commit-count rules shared by the decoding methods.

Each function reproduces one rule of a reference loop exactly, including its dtype and its random draws (their
order and shape): a method that calls these in the reference's order gets the reference's tokens for the same seed.
All randomness comes from an explicit torch.Generator, so requests never share a random stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def argmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.argmax over a vocabulary, through max(): the same index (the first maximum; NaN wins), but CPU argmax
    is a scalar loop for bf16 rows: 838 us for 16 x 8 rows of 4096 logits, max 185 us (2 cores, AVX-512)."""
    return x.max(dim).indices


def gumbel_perturb(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: exp(l) / (-log u)^T. T = 0 returns `logits` itself (no draw, same object)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=gen, device=logits.device)
    return logits.exp() / (-torch.log(u)) ** temperature


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) by inverse CDF: logits [M, V], temperature [M] (> 0),
    u [M] uniform in [0, 1) (float64) -> [M]. The same distribution as the Gumbel-max draw (`gumbel_perturb`,
    argmax of l - T log(-log u) is a sample of softmax(l / T)) from one uniform per row instead of one per logit:
    4x less work on CPU at a 4k vocabulary (no float64 pow over [M, V]), and one batched op for every request.
    The CDF accumulates in float64 (a 126k-entry float32 sum drifts by ~1e-3); a token of probability 0 (banned) is
    never drawn: `right=True` needs cdf[i - 1] <= target < cdf[i]."""
    probs = F.softmax(logits.float() / temperature[:, None].float(), dim=-1)  # [M, V]
    cdf = probs.double().cumsum(-1)  # [M, V]
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]  # [M, 1]: u scaled to the row's total
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(logits.shape[-1] - 1)


def chosen_probability(logits: torch.Tensor, x0: torch.Tensor, rows: torch.Tensor,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(logits)[x0] at the positions `rows` marks (bool like x0), -inf elsewhere; softmax in `dtype` (default
    the logits'). Only the marked rows are normalised: softmax is row-wise, so their values are those of the whole
    tensor's, and a step's other canvas rows (decoded, or outside the block) cost nothing (a [rows, vocab] float64
    block is ~1 MB a row at LLaDA's vocabulary)."""
    out = torch.full(x0.shape, -torch.inf, dtype=dtype or logits.dtype, device=x0.device)
    picked = logits[rows]  # [n, V]
    picked = picked if dtype is None else picked.to(dtype)
    out[rows] = torch.gather(F.softmax(picked, dim=-1), -1, x0[rows].unsqueeze(-1)).squeeze(-1)
    return out


def llada_schedule(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, n] mask flags -> [B, steps] tokens to commit per step: n // steps, +1 on the first n % steps steps."""
    n = block_masks.sum(dim=1, keepdim=True)
    counts = torch.zeros(n.shape[0], steps, dtype=torch.int64, device=block_masks.device) + n // steps
    rem = n % steps
    for b in range(n.shape[0]):
        counts[b, : rem[b]] += 1
    return counts


def random_confidence(shape: tuple[int, int], gen: torch.Generator | None, device) -> torch.Tensor:
    """'random' remasking: uniform float32 scores, drawn after the Gumbel draw of the same step."""
    return torch.rand(shape, generator=gen, device=device)


def top_k_select(confidence: torch.Tensor, k: torch.Tensor | list[int]) -> torch.Tensor:
    """Per row, mark the k[b] highest-confidence positions (torch.topk's tie order) -> bool like confidence."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    for b in range(confidence.shape[0]):
        _, idx = torch.topk(confidence[b], k=int(k[b]))
        chosen[b, idx] = True
    return chosen


def threshold_select(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's rule: over the candidates (finite confidence) the best is always taken, others need >= threshold."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    for b in range(confidence.shape[0]):
        n = int(torch.isfinite(confidence[b]).sum())
        if n == 0:
            continue
        vals, idx = torch.topk(confidence[b], k=n)
        chosen[b, idx[0]] = True
        keep = vals[1:] >= threshold
        chosen[b, idx[1:][keep]] = True
    return chosen


def factor_select(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: commit the top n* where rank n needs c_(n) >= 1 - f/(n+1); at least one."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    for b in range(confidence.shape[0]):
        n = int(torch.isfinite(confidence[b]).sum())
        if n == 0:
            continue
        vals, idx = torch.topk(confidence[b], k=n)
        ranks = torch.arange(1, n + 1, device=vals.device, dtype=torch.float64)
        thr = 1.0 - factor / (ranks + 1.0)
        thr[0] = -1.0
        failing = (vals.to(torch.float64) < thr).nonzero()
        take = n if len(failing) == 0 or int(failing[0]) == n - 1 else max(1, int(failing[0]))
        chosen[b, idx[:take]] = True
    return chosen


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: removed entries get the dtype's minimum (not -inf); the top token always stays."""
    sorted_logits, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's top-k filter: keeps every entry tied with the k-th, fills the rest with the dtype's minimum."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def categorical(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
    """torch.distributions.Categorical(probs).sample() with an explicit generator; None where it would refuse."""
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        return None
    norm = probs / probs.sum(-1, keepdim=True)
    if not bool(((norm.sum(-1) - 1).abs() < 1e-6).all()):
        return None
    flat = norm.reshape(-1, norm.shape[-1])  # [..., V] -> [N, V]
    return torch.multinomial(flat, 1, True, generator=gen).T.reshape(norm.shape[:-1])


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, margin: bool = False, neg_entropy: bool = False,
                  gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sample_tokens: ([...], [...]) confidence and token for logits [..., V]."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    x0 = categorical(probs, gen) if temperature > 0 else None
    if x0 is not None:
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin:
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top2[..., 0] - top2[..., 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_commit_count(num_masked: torch.Tensor, batch: int, s: torch.Tensor, t: torch.Tensor, last: bool) -> int:
    """Dream's per-step count: int(mean masks per row * (1 - s/t)) in float32, everything on the last step."""
    per_row = num_masked / batch
    return int(per_row) if last else int(per_row * (1 - s / t))


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream: the prediction for row i is output row i-1; row 0 keeps its own (the reference duplicates it)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
