"""The decoding-method registry: every method is a named per-request state the engine steps (decoding.step).

Methods are looked up by name (`get_method("fast_dllm_dual")`), never switched on by flags in callers; the engine
(or, offline, `engine.offline.generate`: the same engine step with a pool of one) drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .options import DecodeOptions


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
    options: type[DecodeOptions]  # the knobs it reads (decoding.options); its defaults are the reference's
    validate: Callable[[DecodeOptions], None] | None = None  # checks the options before a request is queued

    def decodes(self, family: str) -> bool:
        return self.family in (family, ANY)

    def make_options(self, given: DecodeOptions | Mapping[str, object] | None = None, **changes) -> DecodeOptions:
        """This method's options: its own options as given, or built from a name -> value mapping (None: the
        defaults), with `changes` on top. A name the method does not declare is a ValueError."""
        if isinstance(given, DecodeOptions):
            if type(given) is not self.options:
                raise TypeError(f"{type(given).__name__} are not method {self.name!r}'s options "
                                f"({self.options.__name__})")
            return given.with_(**changes) if changes else given
        return self.options.build({**(given or {}), **changes}, self.name)


ANY = "any"  # a method that decodes every family (diffuserve's serving mode)


METHODS: dict[str, Method] = {}


def register(name: str, family: str, summary: str, options: type[DecodeOptions],
             validate: Callable[[DecodeOptions], None] | None = None):
    """Class decorator: register a DecodeState subclass as the method `name`, reading `options`."""
    def wrap(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, family, cls, summary, options, validate)
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
