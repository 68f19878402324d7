"""`diffuserve serve`'s flags, generated from the config tree (engine/config.py) so that every field is a flag with
its help text and default, and no flag list is kept by hand. A flag given wins over the environment and the YAML
file; one not given (None here) leaves them be.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields

from diffuserve.engine.config import EngineConfig, ModelConfig, ServerConfig
from diffuserve.engine.decoding import METHODS

SECTIONS = {"model": ModelConfig, "server": ServerConfig, "engine": EngineConfig}
# vLLM's names for the same limits (second flags beside ours), so that an operator's vLLM command lines work.
ALIASES = {("engine", "max_running"): ["--max-num-seqs"], ("engine", "max_rows_per_step"): ["--max-num-batched-tokens"]}
CHOICES = {("model", "dtype"): ["auto", "float32", "bfloat16", "float16", "float64"]}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _value(text: str):
    """A decoding option's value as YAML reads it: 0.9 -> float, 32 -> int, true -> bool, null -> None."""
    import yaml  # pyyaml comes with transformers

    return yaml.safe_load(text)


def _flag_type(hint) -> tuple[dict, str]:
    """A field's type hint -> argparse keywords and the metavar."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not tuple else hint
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}, ""
    if typing.get_origin(hint) is tuple:
        return {"type": _csv}, "A,B"
    return {"type": base}, {int: "N", float: "X"}.get(base, "TEXT")


def _shown(default) -> str:
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return repr(default) if isinstance(default, str) else str(default)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory or bundled model name (default: tiny-text, the "
                   "bundled default; a bundled model gets configs/<name>.yaml unless --config is given)")
    p.add_argument("--config", help="YAML config file (configs/); flags given here win over it and over "
                   "DIFFUSERVE_* variables (default: none, or the bundled model's own)")
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        g = p.add_argument_group(f"{section} (YAML section `{section}:`)")
        for f in fields(cls):
            if (section, f.name) == ("model", "path"):  # the positional above
                continue
            kw, metavar = _flag_type(hints[f.name])
            default = f.default if f.default is not MISSING else f.default_factory()
            names = ["--" + f.name.replace("_", "-"), *ALIASES.get((section, f.name), [])]
            if metavar:
                kw["metavar"] = metavar
            if (section, f.name) in CHOICES:
                kw["choices"] = CHOICES[(section, f.name)]
                kw.pop("metavar", None)
            g.add_argument(*names, dest=f"{section}__{f.name}", default=None,
                           help=f"{f.metadata['help']} (default: {f.metadata['shown'] or _shown(default)})", **kw)
    g = p.add_argument_group("decoding (YAML section `decoding:`); a request's own fields win over these")
    g.add_argument("--method", dest="decoding__method", choices=sorted(METHODS), default=None,
                   help="the method requests get when they name none (default: window)")
    g.add_argument("--option", dest="decoding__options", action="append", metavar="KEY=VALUE", default=None,
                   help="an option of the default method, e.g. --option threshold=0.9 --option temperature=0.7; "
                   "repeatable (default: the method's reference defaults, or the bundled model's config)")
    g.add_argument("--method-option", dest="decoding__methods", action="append", metavar="METHOD.KEY=VALUE",
                   default=None, help="an option of another method, used when a request names it, e.g. "
                   "--method-option guided.verifier=tiny-task-ar; repeatable (default: none)")


def _pairs(items: list[str], flag: str) -> list[tuple[str, object]]:
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out.append((key.strip(), _value(text)))
    return out


def config_overrides(args: argparse.Namespace) -> dict:
    """The flags given -> build_config's keyword overrides (section__key=value)."""
    out = {key: value for key, value in vars(args).items() if "__" in key and value is not None}
    out["model__path"] = args.model
    if args.decoding__options:
        out["decoding__options"] = dict(_pairs(args.decoding__options, "--option"))
    if args.decoding__methods:
        methods: dict[str, dict] = {}
        for key, value in _pairs(args.decoding__methods, "--method-option"):
            method, dot, name = key.partition(".")
            if not dot or not name:
                raise ValueError(f"--method-option expects METHOD.KEY=VALUE, got {key!r}")
            methods.setdefault(method, {})[name] = value
        out["decoding__methods"] = methods
    return out
