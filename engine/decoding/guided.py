"""Method `guided`: FlashDLM's Guided Diffusion (ALGORITHMS.md section 4.3) on the LLaDA family.

Speculative decoding with the diffusion model as the drafter and a small autoregressive model as the verifier:
each round, one diffusion forward drafts every position of a window after the first mask (argmax); the verifier
reads the drafts left to right in chunks (one causal forward per chunk, on its own K/V cache), accepts the longest
run it agrees with, and writes its own token at the first disagreement. Every round commits at least one token,
and with deterministic verification every committed token is the verifier's greedy choice given the prefix: the
output is the verifier's greedy continuation, produced in fewer verifier passes wherever the drafts are right.

The diffusion side uses FreeCache's frozen K/V: a round forwards the tokens accepted since the last round (now
clean, so their K/V are recomputed once and then frozen) plus the drafted window of `window_size` positions
(default 128, the authors' sliding window); the masked suffix beyond it is neither computed nor attended.

The verifier is any local causal LM that shares the diffusion model's tokenizer, loaded with transformers'
AutoModelForCausalLM (no remote code), named by the `verifier` option: a directory or a bundled model's name. It is
set in the configuration or on the command line, never by an HTTP request (it names a path to load).
"""

from __future__ import annotations

import inspect
import threading
from functools import lru_cache

import torch

from ..model import LLADA, DiffusionLM, span_forward
from .llada import new_canvas
from .registry import DecodeOptions, DecodeResult, check, register
from .sampling import argmax, gumbel_perturb

DEFAULT_WINDOW = 128  # drafted positions after the first mask (the authors' sliding_window_size)
VERIFY_CHUNK = 32  # drafts one verifier forward checks (the authors' verify_batch_size)
_lock = threading.Lock()


@lru_cache(maxsize=4)
def load_verifier(name: str):
    """A causal LM from a directory or bundled name, in float32 eval mode (cached per name)."""
    from transformers import AutoModelForCausalLM

    from ..model.bundled import resolve_model

    with _lock:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    return model.eval()


class Verifier:
    """One request's view of the causal LM: its K/V cache always holds a prefix of the committed sequence."""

    def __init__(self, lm):
        from transformers import DynamicCache

        self.lm, self.cache = lm, DynamicCache()
        # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
        self.kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self.calls = 0

    @property
    def cached(self) -> int:
        return self.cache.get_seq_length()

    def predict(self, feed: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones -> the greedy next token after each fed token [len(feed)]."""
        self.calls += 1
        out = self.lm(torch.tensor([feed]), use_cache=True, **{self.kwarg: self.cache})
        return argmax(out.logits[0])

    def keep(self, n: int) -> None:
        if self.cached > n:
            self.cache.crop(n - self.cached)  # a negative count removes tokens in every transformers version


def _verify(ver: Verifier, seq: list[int], f: int, drafts: list[int]) -> list[int]:
    """Tokens to commit at positions f, f+1, ...: the agreeing drafts, then the verifier's correction (if any)."""
    out: list[int] = []
    while len(out) < len(drafts):
        chunk = drafts[len(out):len(out) + VERIFY_CHUNK]
        ver.keep(f + len(out) - 1)  # the cache must end right before the last committed token
        known = seq[:f] + out
        preds = ver.predict(known[ver.cached:] + chunk[:-1]).tolist()[-len(chunk):]  # preds[j] is for chunk[j]
        for d, p in zip(chunk, preds):
            out.append(p)
            if p != d:
                return out  # the first disagreement: the verifier's token, and the round ends
    return out


@register("guided", LLADA, "Guided diffusion: diffusion drafts, a small causal LM verifies left to right")
def generate(model: DiffusionLM, prompt: torch.Tensor, opts: DecodeOptions,
             gen: torch.Generator | None = None) -> DecodeResult:
    check(opts.verifier is not None, "method 'guided' needs a verifier (a causal LM sharing the tokenizer): "
          "set decoding.options.verifier or pass --verifier")
    lm = load_verifier(opts.verifier)
    check(lm.config.vocab_size == model.spec.vocab_size,
          f"the verifier's vocabulary ({lm.config.vocab_size}) is not the model's ({model.spec.vocab_size})")
    window = DEFAULT_WINDOW if opts.window_size is None else opts.window_size
    check(window >= 1, "window_size must be >= 1")
    rows = [_one(model, lm, prompt[b:b + 1], opts, window, gen) for b in range(prompt.shape[0])]
    return DecodeResult(ids=torch.cat([r.ids for r in rows]), forward_calls=sum(r.forward_calls for r in rows),
                        info={"verifier_calls": sum(r.info["verifier_calls"] for r in rows)})


def _one(model: DiffusionLM, lm, prompt: torch.Tensor, opts: DecodeOptions, window: int, gen) -> DecodeResult:
    mask_id, eos = model.spec.mask_id, model.spec.eos_id
    x = new_canvas(prompt, opts.gen_length, mask_id)  # [1, total]
    lp, total = prompt.shape[1], x.shape[1]
    cache = model.new_cache(1, total)
    ver, seq, f, clean_to, calls = Verifier(lm), x[0].tolist(), lp, 0, 0
    with torch.no_grad():
        while f < total:
            q_to = min(total, f + window)
            # Rows: the tokens accepted since the last round (their K/V become clean) and the drafted window.
            logits = span_forward(model, x[:, clean_to:q_to], clean_to, cache, q_to)  # [1, q_to - clean_to, V]
            calls += 1
            drafts = argmax(gumbel_perturb(logits[0, f - clean_to:], opts.temperature, gen))  # [q_to - f]
            taken = _verify(ver, seq, f, drafts.tolist())[:total - f]
            x[0, f:f + len(taken)] = torch.tensor(taken)
            seq[f:f + len(taken)] = taken
            clean_to, f = f, f + len(taken)
            if eos in taken:  # the answer has ended: EOS to the end of the canvas
                x[0, clean_to + taken.index(eos):] = eos
                break
    return DecodeResult(ids=x[:, lp:], forward_calls=calls, info={"verifier_calls": ver.calls})
