"""Causal LMs beside the diffusion model: guided diffusion's verifiers, loaded through transformers (no remote code).

Only the runner calls them (`ModelRunner._verify`), as it calls the diffusion model; a request's decoding state
keeps its own causal K/V cache (`new_cache`) and crops it to its committed prefix.
"""

from __future__ import annotations

import inspect
import threading
from functools import lru_cache

import torch

from .bundled import resolve_model

_lock = threading.Lock()


class CausalLM:
    def __init__(self, lm):
        self.lm = lm
        # transformers 5 names the argument `cache`; earlier versions `past_key_values`.
        self.kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def predict(self, cache, feed: list[int]) -> torch.Tensor:
        """Feed tokens after the cached ones -> the greedy next token after each fed token [len(feed)]."""
        out = self.lm(torch.tensor([feed]), use_cache=True, **{self.kwarg: cache})
        return out.logits[0].max(-1).indices  # (argmax through max: see decoding.sampling.argmax)


@lru_cache(maxsize=4)
def load_verifier(name: str) -> CausalLM:
    """A causal LM from a directory or bundled name, in float32 eval mode (cached per name)."""
    from transformers import AutoModelForCausalLM

    with _lock:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    return CausalLM(model.eval())


def verifier_vocab(name: str) -> int:
    """The verifier's vocabulary size, from its config alone (a state checks it without loading weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(name)).vocab_size


def keep(cache, n: int) -> None:
    """Crop a causal cache to its first n tokens (a prefix of the committed sequence)."""
    cached = cache.get_seq_length()
    if cached > n:
        cache.crop(n - cached)  # a negative count removes tokens in every transformers version


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()
