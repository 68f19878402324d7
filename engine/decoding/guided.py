"""Method `guided`: FlashDLM's Guided Diffusion (ALGORITHMS.md section 4.3) on the LLaDA family.

Speculative decoding with the diffusion model as the drafter and a small autoregressive model as the verifier:
each round, one diffusion forward drafts every position of a window after the first mask (argmax); the verifier
reads the drafts left to right in chunks (one causal forward per chunk, on the request's own K/V cache), accepts
the longest run it agrees with, and writes its own token at the first disagreement. Every round commits at least
one token, and with deterministic verification every committed token is the verifier's greedy choice given the
prefix: the output is the verifier's greedy continuation, produced in fewer verifier passes wherever the drafts are
right.

The diffusion side uses FreeCache's frozen K/V: a round forwards the tokens accepted since the last round (now
clean, so their K/V are recomputed once and then frozen) plus the drafted window of `window_size` positions
(default 128, the authors' sliding window); the masked suffix beyond it is neither computed nor attended.

As a decoding state (`Guided`), a round is one diffusion step (a span plan) followed by one verifier-only step per
chunk (a plan with a `Verify` pass and no segments: the runner runs the causal LM, which is not a forward call).
The state owns the verifier's K/V cache and crops it to the committed prefix; `info["verifier_calls"]` counts the
verifier passes.

The verifier is any local causal LM that shares the diffusion model's tokenizer, loaded by the runner with
transformers' AutoModelForCausalLM (no remote code, `model.causal`), named by the `verifier` option: a directory or
a bundled model's name. It is set in the configuration or on the command line, never by an HTTP request (it names
a path to load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import numpy as np
import torch

from ..model import LLADA
from ..model.causal import keep, new_cache, verifier_vocab
from .options import DecodeOptions
from .registry import check, register
from .sampling import argmax, gumbel_perturb
from .step import LoopState, StepPlan, StepResult, Verify, segment

DEFAULT_WINDOW = 128  # drafted positions after the first mask (the authors' sliding_window_size)
VERIFY_CHUNK = 32  # drafts one verifier forward checks (the authors' verify_batch_size)


@dataclass(frozen=True)
class GuidedOptions(DecodeOptions):
    """No step budget: rounds go on until the verifier has read the canvas (or an EOS)."""

    window_size: int | None = DEFAULT_WINDOW  # drafted positions per round (None: 128)
    verifier: str | None = None  # the causal LM: a directory or a bundled name (configuration only, never HTTP)


@register("guided", LLADA, "Guided diffusion: diffusion drafts, a small causal LM verifies left to right",
          GuidedOptions)
class Guided(LoopState):
    def run(self) -> Generator[StepPlan, StepResult, None]:
        opts, spec = self.opts, self.spec
        check(opts.verifier is not None, "method 'guided' needs a verifier (a causal LM sharing the tokenizer): "
              "set decoding.methods.guided.verifier or pass --verifier")
        vocab = verifier_vocab(opts.verifier)  # from the config alone: the runner loads the weights on first use
        check(vocab == spec.vocab_size, f"the verifier's vocabulary ({vocab}) is not the model's ({spec.vocab_size})")
        window = DEFAULT_WINDOW if opts.window_size is None else opts.window_size
        check(window >= 1, "window_size must be >= 1")
        self.info["verifier_calls"] = 0
        for b in range(self.x.shape[0]):  # a reference batch: each row decoded to its end in turn, as before
            yield from self._row(b, window)

    def _row(self, b: int, window: int) -> Generator[StepPlan, StepResult, None]:
        x, eos, gen, opts = self.x, self.spec.eos_id, self.gen, self.opts
        total = x.shape[1]
        cache, seq, f, clean_to = new_cache(), x[b].tolist(), self.prompt_len, 0
        while f < total:
            q_to = min(total, f + window)
            # Rows: the tokens accepted since the last round (their K/V become clean) and the drafted window, whose
            # logits alone come back; keys: every slot up to the window's end (the masked suffix is pruned).
            pos = np.arange(clean_to, q_to)
            seg = segment(x[b, clean_to:q_to], pos, np.arange(q_to), base=b * total, canvas=total,
                          logits_rows=np.arange(f - clean_to, q_to - clean_to))
            logits = (yield StepPlan([seg])).rows[0].logits  # [q_to - f, V]
            drafts = argmax(gumbel_perturb(logits, opts.temperature, gen))  # [q_to - f]
            taken = (yield from self._verify(cache, seq, f, drafts.tolist()))[:total - f]
            x[b, f:f + len(taken)] = torch.tensor(taken)
            seq[f:f + len(taken)] = taken
            clean_to, f = f, f + len(taken)
            if eos in taken:  # the answer has ended: EOS to the end of the canvas
                x[b, clean_to + taken.index(eos):] = eos
                return

    def _verify(self, cache, seq: list[int], f: int, drafts: list[int]) -> Generator[StepPlan, StepResult, list[int]]:
        """Tokens to commit at positions f, f+1, ...: the agreeing drafts, then the verifier's correction (if any).
        One verifier-only step per chunk of drafts."""
        out: list[int] = []
        while len(out) < len(drafts):
            chunk = drafts[len(out):len(out) + VERIFY_CHUNK]
            keep(cache, f + len(out) - 1)  # the cache must end right before the last committed token
            known = seq[:f] + out
            feed = known[cache.get_seq_length():] + chunk[:-1]
            result = yield StepPlan(verify=Verify(self.opts.verifier, cache, feed, cache.get_seq_length()))
            self.info["verifier_calls"] += 1
            preds = result.verified.tolist()[-len(chunk):]  # preds[j] is the verifier's token for chunk[j]
            for d, p in zip(chunk, preds):
                out.append(p)
                if p != d:
                    return out  # the first disagreement: the verifier's token, and the round ends
        return out
