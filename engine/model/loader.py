"""Loading a published checkpoint directory into DiffusionLM, without trust_remote_code.

Weights come from `model.safetensors` or a sharded `model.safetensors.index.json`, under the published tensor
names of each family. The module is built on the meta device and each tensor is cast to the target dtype as it is
read, so a bf16 8B checkpoint never exists as a float32 copy.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .spec import LLADA, ModelSpec, load_spec
from .transformer import DiffusionLM, Rope

log = logging.getLogger("diffuserve.loader")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
AUTO = "auto"  # the dtype the checkpoint stores (config.json torch_dtype), as vLLM's --dtype auto


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and torch's kernels may use it (its CPU
    capability is AVX-512: ATEN_CPU_CAPABILITY=avx2 pins kernels that cannot). Only there does bf16 pay on a CPU:
    1.5x faster training steps on such a CPU, 8x slower on an AVX2-only EPYC."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def resolve_dtype(model_dir: str | Path, dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """A dtype name -> torch dtype. `auto` is the checkpoint's stored torch_dtype, as in vLLM, except that a CPU
    without native bf16 computes a bf16 or fp16 checkpoint in float32 (emulated half precision is several times
    slower there, and the parity fixtures' bf16 matmuls need AVX-512 kernels)."""
    if not isinstance(dtype, str):
        return dtype
    if dtype == AUTO:
        stored = json.loads((Path(model_dir) / "config.json").read_text()).get("torch_dtype", "float32")
        chosen = DTYPES.get(stored, torch.float32)
        if chosen in (torch.bfloat16, torch.float16) and str(device).startswith("cpu") and not native_bf16():
            log.info("dtype auto: %s is stored, but this CPU has no native bf16: computing in float32", stored)
            return torch.float32
        return chosen
    return DTYPES[dtype]

# Our parameter name -> published name, per family. "{i}" is the layer index.
_LLADA_NAMES = {
    "embed.weight": "model.transformer.wte.weight",
    "norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "layers.{i}.attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
    "layers.{i}.q_proj.weight": "model.transformer.blocks.{i}.q_proj.weight",
    "layers.{i}.k_proj.weight": "model.transformer.blocks.{i}.k_proj.weight",
    "layers.{i}.v_proj.weight": "model.transformer.blocks.{i}.v_proj.weight",
    "layers.{i}.q_proj.bias": "model.transformer.blocks.{i}.q_proj.bias",
    "layers.{i}.k_proj.bias": "model.transformer.blocks.{i}.k_proj.bias",
    "layers.{i}.v_proj.bias": "model.transformer.blocks.{i}.v_proj.bias",
    "layers.{i}.o_proj.weight": "model.transformer.blocks.{i}.attn_out.weight",
    "layers.{i}.ffn_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
    "layers.{i}.gate_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
    "layers.{i}.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
    "layers.{i}.down_proj.weight": "model.transformer.blocks.{i}.ff_out.weight",
}
_DREAM_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def published_names(spec: ModelSpec) -> dict[str, str]:
    """Every parameter of DiffusionLM(spec) -> its published tensor name."""
    table = _LLADA_NAMES if spec.family == LLADA else _DREAM_NAMES
    out = {}
    for ours, theirs in table.items():
        if ".bias" in ours and not spec.qkv_bias:
            continue
        if "{i}" in ours:
            for i in range(spec.num_layers):
                out[ours.format(i=i)] = theirs.format(i=i)
        else:
            out[ours] = theirs
    return out


def _shard_files(model_dir: Path) -> dict[str, Path]:
    """Published tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "float32",
               device: str = "cpu") -> DiffusionLM:
    model_dir = Path(model_dir)
    torch_dtype = resolve_dtype(model_dir, dtype, device)
    spec = load_spec(model_dir)
    t0 = time.monotonic()
    with torch.device("meta"):
        model = DiffusionLM(spec)
    names = published_names(spec)
    files = _shard_files(model_dir)
    missing = [theirs for theirs in names.values() if theirs not in files]
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, theirs in names.items():
        by_file.setdefault(files[theirs], []).append((ours, theirs))
    state = {}
    for n, (path, pairs) in enumerate(sorted(by_file.items()), 1):
        log.info("loading shard %d/%d: %s", n, len(by_file), path.name)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for ours, theirs in pairs:
                # One tensor at a time, cast straight to the target dtype and device.
                state[ours] = f.get_tensor(theirs).to(device=device, dtype=torch_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope = Rope(spec).to(device)  # its buffer is not in the checkpoint; rebuild it off the meta device
    log.info("loaded %s (%s, %d layers) in %.1fs", model_dir, spec.family, spec.num_layers, time.monotonic() - t0)
    return model.eval()
