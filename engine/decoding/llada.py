"""Method `llada`: the published LLaDA sampler (ML-GSAI/LLaDA generate.py), token for token.

Semi-autoregressive blocks; in each of `steps / num_blocks` steps per block a full forward over the whole canvas,
Gumbel-max sampling in float64, and the integer schedule's number of commits, chosen by confidence (softmax in
the logits' dtype) or at random, confined to the current block. Optional classifier-free guidance, EOS logit
suppression and EOS/EoT confidence suppression, with the reference's exact (chained-assignment) semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import LLADA
from .options import Blocks, LladaSampling
from .registry import check, register
from .sampling import argmax, chosen_probability, gumbel_perturb, llada_schedule, random_confidence, top_k_select
from .step import LoopState, StepPlan, StepResult, full_plan


@dataclass(frozen=True)
class LladaOptions(Blocks, LladaSampling):
    cfg_scale: float = 0.0  # classifier-free guidance (a second, prompt-masked pass in the same forward)
    logits_eos_inf: bool = False  # EOS never proposed
    confidence_eos_eot_inf: bool = False  # EOS / EoT never ranked first (the reference's chained semantics)


def block_plan(opts: Blocks) -> tuple[int, int, int]:
    """(block_length, num_blocks, steps_per_block), validated the way the references assert."""
    gen, block, steps = opts.gen_length, opts.n_block, opts.n_steps
    check(gen > 0 and block > 0 and steps > 0, "gen_length, block_length and steps must be positive")
    check(gen % block == 0, f"gen_length ({gen}) must be a multiple of block_length ({block})")
    num_blocks = gen // block
    check(steps % num_blocks == 0, f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    return block, num_blocks, steps // num_blocks


def cfg_plan(x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int, refresh: bool = False) -> StepPlan:
    """Classifier-free guidance's forward: every row of x [B, N] and, in slots of its own (rows B..2B-1), the same
    row with its prompt masked: the reference's one forward over [x; un_x]."""
    un_x = x.clone()
    un_x[prompt_index] = mask_id
    return full_plan(torch.cat([x, un_x]), refresh)


def cfg_logits(result: StepResult, scale: float) -> torch.Tensor:
    """[2B, N, V] -> un + (s+1)(cond - un), [B, N, V]."""
    cond, un = torch.chunk(result.stack(), 2, dim=0)
    return un + (scale + 1) * (cond - un)


def cfg_slots(rows: int, canvas: int, opts: LladaOptions) -> int:
    return rows * canvas * (2 if opts.cfg_scale > 0 else 1)


@register("llada", LLADA, "LLaDA reference sampler: blocks x steps, top-k commits by confidence", LladaOptions)
class Llada(LoopState):
    slots_needed = staticmethod(cfg_slots)

    def run(self):
        spec, opts, x, gen = self.spec, self.opts, self.x, self.gen
        check(opts.remasking in ("low_confidence", "random"), f"unknown remasking {opts.remasking!r}")
        block, num_blocks, steps = block_plan(opts)
        lp = self.prompt_len
        prompt_index = x != spec.mask_id
        for b in range(num_blocks):
            block_end = lp + (b + 1) * block
            counts = llada_schedule(x[:, block_end - block: block_end] == spec.mask_id, steps)
            for i in range(steps):
                mask_index = x == spec.mask_id
                if opts.cfg_scale > 0:
                    logits = cfg_logits((yield cfg_plan(x, prompt_index, spec.mask_id)), opts.cfg_scale)
                else:
                    logits = (yield full_plan(x)).stack()  # [B, N, V]
                in_block = mask_index.clone()
                in_block[:, block_end:] = False
                x0, conf = _propose(logits, opts, spec, gen, in_block)
                conf[:, block_end:] = -np.inf
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, conf, -np.inf)
                chosen = top_k_select(confidence, counts[:, i])
                x[chosen] = x0[chosen]


def _propose(logits: torch.Tensor, opts: LladaOptions, spec, gen, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's candidate tokens [B, L] and their confidence [B, L], as the reference computes them (the
    softmax confidence only at `rows`, the positions that can commit; -inf elsewhere)."""
    if opts.logits_eos_inf:
        logits[:, :, spec.eos_id] = -torch.inf
    noisy = gumbel_perturb(logits, opts.temperature, gen)
    x0 = argmax(noisy)
    if opts.confidence_eos_eot_inf:
        # The reference's chained assignment: EOS leaves the *noisy* logits, EoT the plain ones. At T = 0 they are
        # the same tensor, so both vanish before the softmax; at T > 0 only EoT does.
        noisy[:, :, spec.eos_id] = -torch.inf
        logits[:, :, spec.eot_id] = -torch.inf
    if opts.remasking == "low_confidence":
        conf = chosen_probability(logits, x0, rows)  # in the logits' dtype, as the reference
    else:
        conf = random_confidence((x0.shape[0], x0.shape[1]), gen, x0.device)
    return x0, conf
