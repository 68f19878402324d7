"""The config tree: YAML, environment and flags build it; it is frozen and validated once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffuserve.engine.config import build_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_env_then_flags(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = build_config("configs/llada-tiny.yaml")
    assert cfg.model.served_model_name == "llada-tiny" and cfg.decoding.method == "fast_dllm_prefix"
    assert cfg.decoding.options["threshold"] == 0.9 and cfg.server.host == "127.0.0.1"
    monkeypatch.setenv("DIFFUSERVE_PORT", "9001")
    cfg = build_config("configs/llada-tiny.yaml", server__port=None)
    assert cfg.server.port == 9001
    cfg = build_config("configs/llada-tiny.yaml", server__port=9002)
    assert cfg.server.port == 9002
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1


def test_every_shipped_config_is_valid(monkeypatch):
    monkeypatch.chdir(ROOT)
    import yaml

    stand_ins = {"llada": "tests/fixtures/parity/llada-tiny/model", "dream": "tests/fixtures/parity/dream-tiny/model"}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        model = yaml.safe_load(path.read_text())["model"]["path"]
        if model.startswith("/"):  # a real checkpoint's directory: served as `serve DIR --config FILE` would be
            family = "dream" if "dream" in path.name else "llada"
            cfg = build_config(str(path), model__path=stand_ins[family])
            assert cfg.decoding.method is not None and cfg.model.dtype == "bfloat16"
        else:
            build_config(str(path))


@pytest.mark.parametrize("override,message", [
    ({"model__path": "/nonexistent"}, "neither a directory nor a bundled model"),
    ({"model__dtype": "int8"}, "model.dtype"),
    ({"decoding__method": "warp_drive"}, "unknown"),
    ({"server__port": 70000}, "server.port"),
])
def test_invalid_values_are_named(monkeypatch, override, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message):
        build_config("configs/llada-tiny.yaml", **override)


def test_unknown_yaml_keys_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: .\n  colour: blue\n")
    with pytest.raises(ValueError, match="colour"):
        build_config(str(bad))


def test_a_verifier_that_does_not_resolve_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: tests/fixtures/parity/llada-tiny/model\ndecoding:\n  method: guided\n"
                   "  options:\n    verifier: /nonexistent-ar\n")
    with pytest.raises(ValueError, match="verifier: .*nonexistent-ar"):
        build_config(str(bad))


def test_each_method_reads_only_its_own_options(tmp_path, monkeypatch):
    """decoding.options belong to the default method: a knob it does not read is named at start-up, as is one in
    another method's section; a request naming another method gets that section plus the common knobs."""
    from diffuserve.engine.decoding import METHODS

    monkeypatch.chdir(ROOT)
    head = "model:\n  path: tests/fixtures/parity/llada-tiny/model\ndecoding:\n  method: window\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(head + "  options:\n    block_length: 32\n")
    with pytest.raises(ValueError, match="decoding.options: method 'window' has no option 'block_length'"):
        build_config(str(bad))
    bad.write_text(head + "  methods:\n    llada:\n      threshold: 0.9\n")
    with pytest.raises(ValueError, match="decoding.methods.llada: method 'llada' has no option 'threshold'"):
        build_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text(head + "  options:\n    gen_length: 96\n    threshold: 0.8\n"
                    "  methods:\n    fast_dllm:\n      block_length: 32\n")
    cfg = build_config(str(good))
    window = cfg.decoding.options_for(METHODS["window"], "window")
    fast = cfg.decoding.options_for(METHODS["fast_dllm"], "window")
    assert (type(window).__name__, window.gen_length, window.threshold) == ("WindowOptions", 96, 0.8)
    assert (type(fast).__name__, fast.gen_length, fast.block_length, fast.threshold) == ("FastDllmOptions", 96, 32,
                                                                                         None)


def test_auto_dtype_is_accepted_and_loads_the_stored_dtype(monkeypatch):
    """`--dtype auto` (vLLM's spelling) validates, and the loader reads it as config.json's torch_dtype."""
    monkeypatch.chdir(ROOT)
    import torch

    from diffuserve.engine.model.loader import resolve_dtype

    cfg = build_config("configs/llada-tiny.yaml", model__dtype="auto")
    assert cfg.model.dtype == "auto"
    monkeypatch.setattr("diffuserve.engine.model.loader.native_bf16", lambda: True)
    assert resolve_dtype(cfg.model.path, cfg.model.dtype) == torch.bfloat16  # the parity checkpoint stores bf16
    # A CPU without native bf16 computes it in float32 (emulated bf16 is several times slower); a GPU does not care
    monkeypatch.setattr("diffuserve.engine.model.loader.native_bf16", lambda: False)
    assert resolve_dtype(cfg.model.path, cfg.model.dtype) == torch.float32
    assert resolve_dtype(cfg.model.path, cfg.model.dtype, "cuda:0") == torch.bfloat16
    assert resolve_dtype(cfg.model.path, "bfloat16") == torch.bfloat16  # a dtype asked for by name is kept


def test_auto_is_the_default_dtype_and_native_bf16_follows_torchs_kernels():
    """Served without a dtype, a model gets `auto`; under ATEN_CPU_CAPABILITY=avx2 (the suite's pin: torch's AVX2
    kernels have no bf16 matmul) no CPU counts as native bf16."""
    import os

    from diffuserve.engine.model.loader import native_bf16

    assert build_config().model.dtype == "auto"
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert not native_bf16()
