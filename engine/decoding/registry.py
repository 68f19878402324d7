"""The decoding-method registry: every method is a named per-request state the engine steps (decoding.step).

Methods are looked up by name (`get_method("fast_dllm_dual")`), never switched on by flags in callers; the engine
(or, offline, `engine.offline.generate`: the same engine step with a pool of one) drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class DecodeOptions:
    """Every knob any method reads; each method documents which ones it uses. Defaults are the references'."""

    gen_length: int = 128
    steps: int | None = None  # None: gen_length (one token per step)
    block_length: int | None = None  # None: gen_length (a single block)
    temperature: float = 0.0
    # LLaDA family
    remasking: str = "low_confidence"  # or "random"
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    # Fast-dLLM parallel decoding
    threshold: float | None = None
    factor: float | None = None
    # Dream family
    alg: str = "entropy"  # origin | maskgit_plus | topk_margin | entropy | confidence_threshold
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    # Window-Diffusion (window_llada / window_dream); names are the references' keyword arguments
    refresh_cycle: int | None = None  # steps per refresh phase; None: window_size (LLaDA) or 4 (Dream)
    # window_size means different things to two references, so each method supplies its own default for None:
    # window_llada: the refresh period when refresh_cycle is None (5); streaming: kept suffix positions (32).
    window_size: int | None = None
    window_tokens: int = 64  # window_llada, window: outer window, counted in masks (fixed for a phase)
    active_tokens: int = 8  # window_llada, window: active window, counted in masks (recomputed every step)
    o_win_size: int = 9  # Dream: outer window = the prefix through the (o_win_size - 1)-th mask
    i_win_size: int = 5  # Dream: inner window = first mask up to the (i_win_size + 1)-th mask
    slide_window: bool = False  # Dream: pruned steps move the inner window's end with the remaining masks
    early_stop: bool = False  # Dream: one commit per pruned step, cut at the first EOS, then refresh every step
    # (freecache: EOS after the first EOS, stop once nothing left of it is masked)
    # Streaming-dLLM (streaming_*); also reads window_size above as its kept-suffix window
    confidence_alpha: float | None = None  # dynamic-threshold strength; None: the reference's (LLaDA 0.3, Dream 0.9)
    eos_id: int | None = None  # LLaDA: early-exit token; None: the checkpoint's EOS (reference default 126081)
    eos: int | None = None  # Dream: early-exit token; None: the checkpoint's EOS (the reference requires it)
    # diffuserve's own serving modes (window): how a refresh step recomputes, and whether to stop at EOS
    refresh: str = "window"  # "full": the whole canvas (as the reference); "window": prompt + decoded + W masks
    eos_early_exit: bool = True  # stop once an EOS is committed and everything left of it is decoded
    # Guided diffusion (guided): the verifying causal LM, a directory or bundled name; config or CLI only, never
    # an HTTP field (it names a path to load). It also reads window_size as its drafted window (128).
    verifier: str | None = None

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length

    @property
    def n_block(self) -> int:
        return self.block_length if self.block_length is not None else self.gen_length

    def with_(self, **changes) -> "DecodeOptions":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class DecodeResult:
    ids: torch.Tensor  # [B, gen] the canvas after the prompt (an early exit may shorten or EOS-fill it)
    forward_calls: int = 0
    refresh_calls: int = 0
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # the model family it decodes ("llada" or "dream"), or ANY
    # (spec, prompt [B, Lp], opts, gen) -> a per-request DecodeState (decoding.step) the engine steps; its class
    # method slots_needed(rows, canvas, opts) is the KV capacity the request needs.
    state: type
    summary: str
    validate: Callable[[DecodeOptions], None] | None = None  # checks the options before a request is queued

    def decodes(self, family: str) -> bool:
        return self.family in (family, ANY)


ANY = "any"  # a method that decodes every family (diffuserve's serving mode)


METHODS: dict[str, Method] = {}


def register(name: str, family: str, summary: str, validate: Callable[[DecodeOptions], None] | None = None):
    """Class decorator: register a DecodeState subclass as the method `name`."""
    def wrap(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, family, cls, summary, validate)
        return cls

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown decoding method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def methods_for(family: str) -> list[str]:
    return sorted(n for n, m in METHODS.items() if m.decodes(family))


def check(cond: bool, message: str) -> None:
    """Option validation inside a method: a ValueError the server turns into a 400."""
    if not cond:
        raise ValueError(message)
