"""Decoding options: each method declares the knobs it reads, as a frozen dataclass (`Method.options`).

`DecodeOptions` holds what every method reads (the canvas length and the sampling temperature); the families'
shared knobs are the bases below, and each method module subclasses them with its own (`LladaOptions`,
`WindowOptions`, ...). Defaults are the references'. A name means one thing everywhere it is declared, so the
configuration, the command line and the HTTP fields map onto any method's options by name, and a name the chosen
method does not declare is an error (`build`), never a silently ignored knob.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Mapping


@dataclass(frozen=True)
class DecodeOptions:
    """What every method reads."""

    gen_length: int = 128  # the canvas after the prompt
    temperature: float = 0.0

    def with_(self, **changes) -> "DecodeOptions":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def build(cls, values: Mapping[str, object], method: str = "") -> "DecodeOptions":
        """These options from a name -> value mapping; a name this class does not declare is a ValueError."""
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            who = f"method {method!r}" if method else cls.__name__
            raise ValueError(f"{who} has no option {', '.join(map(repr, unknown))}; "
                             f"its options: {', '.join(sorted(cls.field_names()))}")
        return cls(**values)

    @classmethod
    def field_type(cls, name: str) -> type:
        """The declared type of a field, without its None: 'int | None' -> int (for command-line parsing)."""
        t = typing.get_type_hints(cls)[name]
        args = [a for a in typing.get_args(t) if a is not type(None)] if isinstance(t, types.UnionType) else [t]
        return args[0] if args else str


@dataclass(frozen=True)
class Stepped(DecodeOptions):
    """A method with a step budget (all but `guided`, whose rounds end when the verifier has read the canvas)."""

    steps: int | None = None  # None: gen_length (one token per step)

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length


@dataclass(frozen=True)
class LladaSampling(Stepped):
    """The LLaDA references' commit ranking."""

    remasking: str = "low_confidence"  # or "random"


@dataclass(frozen=True)
class Blocks:
    """Mixin for semi-autoregressive blocks (declared after the family's fields)."""

    block_length: int | None = None  # None: gen_length (a single block)

    @property
    def n_block(self) -> int:
        return self.block_length if self.block_length is not None else self.gen_length


@dataclass(frozen=True)
class DreamSampling(Stepped):
    """Dream's diffusion_generate sampling knobs."""

    alg: str = "entropy"  # origin | maskgit_plus | topk_margin | entropy | confidence_threshold (block methods)
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3


def carried(opts: DecodeOptions, cls: type[DecodeOptions]) -> DecodeOptions:
    """`opts` as another method's options: the fields both declare carry over, the rest keep `cls`'s defaults (a
    baseline run on the same canvas and schedule)."""
    common = opts.field_names() & cls.field_names()
    return cls(**{k: getattr(opts, k) for k in common})


def all_fields(classes) -> dict[str, type]:
    """name -> declared type over several option classes (one name has one type everywhere)."""
    out: dict[str, type] = {}
    for cls in classes:
        for f in fields(cls):
            out.setdefault(f.name, cls.field_type(f.name))
    return out
