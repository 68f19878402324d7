"""Method `dream`: Dream's published diffusion_generate sampler, token for token.

Every step runs a full forward, shifts the logits right by one (Dream predicts position p from row p-1), and
commits int(masks * (1 - s/t)) positions on the float32 linspace(1, eps, steps+1) schedule (all that is left on
the last step), ranked by the `alg` confidence: maskgit_plus (probability), topk_margin (top1 - top2), entropy
(negative entropy), or `origin` (each mask independently with probability 1 - s/t, in random order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import DREAM, DiffusionLM, ForwardBatch
from .llada import new_canvas
from .registry import DecodeOptions, DecodeResult, check, register
from .sampling import dream_commit_count, sample_tokens, shift_logits

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def alg_confidence(mask_logits: torch.Tensor, opts: DecodeOptions, gen, alg: str | None = None):
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


def masked_logits(model: DiffusionLM, x: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
    """shift_logits(full logits)[mask_index], [n_masked, V], projecting only the rows that are read: the shift
    moves hidden states (cheap) instead of logits, and the vocabulary projection runs on masked rows only."""
    pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
    h = shift_logits(model.hidden_states(ForwardBatch(ids=x, positions=pos)))  # [B, L, H], row p holds p-1's
    return model.lm_head(h[mask_index])


@register("dream", DREAM, "Dream reference sampler: full forward per step, linspace schedule, alg confidence")
def generate(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions,
             gen: torch.Generator | None = None) -> DecodeResult:
    check(opts.alg in DREAM_ALGS, f"alg must be one of {', '.join(DREAM_ALGS)} for method dream")
    steps = opts.n_steps
    check(steps > 0 and opts.gen_length > 0, "steps and gen_length must be positive")
    mask_id = model.spec.mask_id
    x = new_canvas(prompt, opts.gen_length, mask_id)
    timesteps = torch.linspace(1, opts.eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id
        mask_logits = masked_logits(model, x, mask_index)
        t, s = timesteps[i], timesteps[i + 1]
        last = i == steps - 1
        if opts.alg == "origin":
            _origin_step(x, mask_index, mask_logits, opts, 1 if last else 1 - s / t, gen, mask_id)
            continue
        confidence, x0 = alg_confidence(mask_logits, opts, gen)
        count = dream_commit_count(mask_index.sum(), mask_index.shape[0], s, t, last)
        commit_ranked(x, mask_index, x0, confidence, count, opts.alg_temp, gen)
    return DecodeResult(ids=x[:, prompt.shape[1]:], forward_calls=steps)
