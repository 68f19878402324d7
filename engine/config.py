"""The one configuration tree, frozen and validated once at start-up.

YAML files (configs/), environment variables (DIFFUSERVE_*) and CLI flags only *build* it, in that order of
precedence (CLI wins); nothing reads settings from anywhere else after start-up. A bundled model served without a
YAML file gets its own, configs/<name>.yaml (its measured serving defaults).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .decoding import METHODS, DecodeOptions, Method
from .model import DTYPES
from .model.loader import AUTO
from .model.bundled import DEFAULT_MODEL, MODELS_DIR, bundled_names, resolve_model

DEFAULT_METHOD = {"llada": "llada", "dream": "dream"}  # offline default: the family's reference sampler
SERVING_METHOD = {"llada": "window", "dream": "window"}  # server default when neither request nor config names one


def setting(default, help: str, shown: str | None = None):
    """A config field with the help text `diffuserve serve --help` shows beside its default (or `shown`)."""
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class ModelConfig:
    path: str = setting("", "checkpoint directory, or a bundled model's name (default: the bundled default)")
    # auto: the checkpoint's stored dtype (float32 on a CPU without native bf16), as vLLM
    dtype: str = setting("auto", "weights and activations dtype; auto: the checkpoint's (float32 on a CPU "
                         "without native bf16)")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    served_model_name: str | None = setting(None, "the model id clients use", "the directory's name")

    @property
    def served(self) -> str:
        """The model id clients use."""
        return self.served_model_name or self.path.rstrip("/").split("/")[-1]


@dataclass(frozen=True)
class DecodingConfig:
    """Each method reads its own options (decoding.options): `options` are the default method's, by name (the ones
    every method reads, gen_length and temperature, are every method's defaults); `methods` holds other methods'
    options, used when a request names one, e.g. {"guided": {"verifier": "tiny-task-ar"}}."""

    method: str | None = None  # None: the serving default of the model's family (SERVING_METHOD)
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    methods: Mapping[str, Mapping[str, object]] = field(default_factory=lambda: MappingProxyType({}))

    def default_method(self, family: str) -> str:
        return self.method or SERVING_METHOD[family]

    def options_for(self, method: Method, default: str) -> DecodeOptions:
        """`method`'s configured options (its declared defaults where nothing is configured); `default` names the
        default method, the one `options` belong to."""
        own = self.options if method.name == default else {
            k: v for k, v in self.options.items() if k in DecodeOptions.field_names()}
        return method.make_options({**own, **self.methods.get(method.name, {})})

    def problems(self) -> list[str]:
        """What is wrong with these options: each configured method's options are built here, once."""
        if self.method is not None and self.method not in METHODS:
            return [f"decoding.method {self.method!r} unknown; known: {sorted(METHODS)}"]
        errors, built = [], []
        for default in sorted({self.method} if self.method else set(SERVING_METHOD.values())):
            for name, where in [(default, "decoding.options")] + [(n, f"decoding.methods.{n}") for n in self.methods]:
                if name not in METHODS:
                    errors.append(f"{where}: unknown method {name!r}; known: {sorted(METHODS)}")
                    continue
                try:
                    opts = self.options_for(METHODS[name], default)
                    if METHODS[name].validate is not None:
                        METHODS[name].validate(opts)
                    built.append(opts)
                except (ValueError, TypeError) as exc:
                    errors.append(f"{where}: {exc}")
        for verifier in {getattr(o, "verifier", None) for o in built} - {None}:
            try:
                resolve_model(verifier)
            except FileNotFoundError as exc:
                errors.append(f"verifier: {exc}")
        return sorted(set(errors))


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "bind address (loopback unless told otherwise)")
    port: int = setting(8000, "port")
    api_key: str | None = setting(None, "API key, or several separated by commas; /v1/ routes then need one")
    max_body_bytes: int = setting(1 << 20, "largest request body accepted, checked before parsing (413)")
    max_header_bytes: int = setting(32 << 10, "largest request head (line + headers) accepted (431/400)")
    head_timeout_s: float = setting(10.0, "a connection must send a complete request head within this (slow-loris)")
    body_timeout_s: float = setting(30.0, "and then its whole body within this (408)")
    keep_alive_s: float = setting(5.0, "an idle keep-alive connection is closed after this")
    docs: bool = setting(True, "serve /docs and /openapi.json")
    cors_origins: tuple[str, ...] = setting((), "browser origins allowed to call the API, comma-separated")
    max_n: int = setting(16, "most choices per prompt (n)")
    max_prompts: int = setting(32, "most prompts in one /v1/completions body")
    max_stop: int = setting(4, "most stop strings (OpenAI's limit)")
    metrics_prefix: str = setting("diffuserve", "prefix of the Prometheus metric names; 'vllm' lets a vLLM "
                                  "dashboard read them unchanged")


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = setting(64, "requests stepped together")
    max_waiting: int = setting(256, "requests queued beyond the running set; more get 429")
    max_rows_per_step: int = setting(8192, "query rows one batched forward may compute")
    max_running_per_body: int | None = setting(None, "running slots one body's prompts x n choices may hold; its "
                                               "others wait for them", "half of max_running")
    kv_cache_mb: int = setting(1024, "the shared KV pool's budget, MiB")
    request_timeout_s: float = setting(600.0, "a request still running after this is ended (504)")
    drain_timeout_s: float = setting(30.0, "on SIGTERM, how long in-flight requests get to finish")
    stall_timeout_s: float = setting(300.0, "requests waiting or running and no engine step finished within this: "
                                     "/health turns 503 and the watchdog ends the process (status 1)")
    threads: int | None = setting(None, "torch threads of the engine thread", "torch's, one per core")
    batch_invariant: bool = setting(False, "bit-stable outputs: each request runs in a forward of its own, exactly as "
                                    "when alone (batched forwards can change a temperature-0 token with the batch; "
                                    "costs the batching speed-up)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> "Config":
        errors = []
        if not self.model.path:
            errors.append("model.path is required")
        elif not Path(self.model.path).is_dir():
            errors.append(f"model.path {self.model.path!r} is not a directory")
        if self.model.dtype not in DTYPES and self.model.dtype != AUTO:
            errors.append(f"model.dtype must be one of {sorted(DTYPES) + [AUTO]}")
        if self.model.device not in ("cpu", "cuda") and not self.model.device.startswith("cuda:"):
            errors.append("model.device must be cpu or cuda[:N]")
        errors += self.decoding.problems()
        s = self.server
        if not 0 < s.port < 65536:
            errors.append("server.port must be in 1..65535")
        if min(s.max_body_bytes, s.max_header_bytes, s.max_n, s.max_prompts) < 1 or s.max_stop < 0:
            errors.append("server limits must be positive")
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", s.metrics_prefix):
            errors.append("server.metrics_prefix must be a Prometheus name: letters, digits, _ (not first a digit)")
        if min(s.head_timeout_s, s.body_timeout_s, s.keep_alive_s) <= 0:
            errors.append("server timeouts must be positive")
        e = self.engine
        if min(e.max_running, e.max_rows_per_step, e.kv_cache_mb) < 1 or e.max_waiting < 0:
            errors.append("engine limits must be positive (max_waiting may be 0)")
        if e.max_running_per_body is not None and not 1 <= e.max_running_per_body <= e.max_running:
            errors.append("engine.max_running_per_body must be between 1 and max_running")
        if e.request_timeout_s <= 0 or e.drain_timeout_s < 0 or e.stall_timeout_s <= 0:
            errors.append("engine.request_timeout_s and stall_timeout_s must be positive, drain_timeout_s not "
                          "negative")
        if errors:
            raise ValueError("invalid configuration: " + "; ".join(errors))
        return self


def _section(cls, values: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)}")
    return values


def bundled_config(model: str | None) -> str | None:
    """A bundled model served without --config gets its measured serving defaults, configs/<name>.yaml beside
    models/ (the default model included); a directory path gets none."""
    name = model or DEFAULT_MODEL
    if "/" in name or name not in bundled_names():
        return None
    path = MODELS_DIR.parent / "configs" / f"{name}.yaml"
    return str(path) if path.is_file() else None


def build_config(yaml_path: str | None = None, **overrides) -> Config:
    """YAML, then DIFFUSERVE_* environment, then keyword overrides (section__key=value, None = not given)."""
    raw: dict[str, dict] = {"model": {}, "decoding": {}, "server": {}, "engine": {}}
    yaml_path = yaml_path or bundled_config(overrides.get("model__path") or os.environ.get("DIFFUSERVE_MODEL"))
    if yaml_path:
        import yaml  # pyyaml comes with transformers

        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        for section, values in data.items():
            if section not in raw:
                raise ValueError(f"unknown section {section!r} in {yaml_path}")
            raw[section].update(values or {})
    env = {"model__path": "DIFFUSERVE_MODEL", "server__api_key": "DIFFUSERVE_API_KEY",
           "server__host": "DIFFUSERVE_HOST", "server__port": "DIFFUSERVE_PORT",
           "server__docs": "DIFFUSERVE_DOCS"}
    for key, var in env.items():
        if os.environ.get(var):
            section, name = key.split("__")
            value: object = os.environ[var]
            if name == "port":
                value = int(value)
            elif name == "docs":
                value = value.lower() in ("1", "true", "yes", "on")
            raw[section][name] = value
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split("__")
        if key == "decoding__options":  # option by option, over the YAML's
            raw[section][name] = {**(raw[section].get(name) or {}), **value}
        elif key == "decoding__methods":
            given = dict(raw[section].get(name) or {})
            raw[section][name] = {m: {**(given.get(m) or {}), **opts} for m, opts in {**given, **value}.items()}
        else:
            raw[section][name] = value
    try:  # a bundled model's name (or nothing: the default bundled model) becomes its directory
        raw["model"]["path"] = resolve_model(raw["model"].get("path"))
    except FileNotFoundError as exc:
        raise ValueError(f"invalid configuration: {exc}") from None
    opts = MappingProxyType(dict(raw["decoding"].pop("options", {}) or {}))
    per_method = MappingProxyType({name: MappingProxyType(dict(v or {}))
                                   for name, v in (raw["decoding"].pop("methods", {}) or {}).items()})
    decoding = DecodingConfig(options=opts, methods=per_method, **_section(DecodingConfig, raw["decoding"], "decoding"))
    return Config(model=ModelConfig(**_section(ModelConfig, raw["model"], "model")), decoding=decoding,
                  server=ServerConfig(**_section(ServerConfig, raw["server"], "server")),
                  engine=EngineConfig(**_section(EngineConfig, raw["engine"], "engine"))).validate()

