"""Writing a DiffusionLM in the published HF layout: config.json keys, tensor names, optional sharding.

What we write loads unchanged in the authors' code (and in ours), so trained and pruned checkpoints follow exactly
the path real LLaDA / Dream checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loader import published_names
from .spec import LLADA, ModelSpec
from .transformer import DiffusionLM


def published_config(spec: ModelSpec, dtype: torch.dtype) -> tuple[dict, dict | None]:
    """(config.json, generation_config.json or None) with the keys each family publishes."""
    dtype_name = str(dtype).removeprefix("torch.")
    if spec.family == LLADA:
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
            "d_model": spec.hidden_size, "n_layers": spec.num_layers, "n_heads": spec.num_heads,
            "n_kv_heads": spec.num_kv_heads, "mlp_hidden_size": spec.intermediate_size, "mlp_ratio": 4,
            "vocab_size": spec.vocab_size, "embedding_size": spec.vocab_size, "rope": True, "alibi": False,
            "rope_theta": spec.rope_theta, "rope_full_precision": True, "rms_norm_eps": spec.rms_norm_eps,
            "layer_norm_type": "rms", "activation_type": "silu", "include_bias": False,
            "include_qkv_bias": spec.qkv_bias, "weight_tying": False, "max_sequence_length": spec.max_positions,
            "mask_token_id": spec.mask_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id,
            "bos_token_id": spec.bos_id, "eot_token_id": spec.eot_id, "torch_dtype": dtype_name,
            "use_cache": False,
        }, None
    cfg = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_positions, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": None, "mask_token_id": spec.mask_id, "eos_token_id": spec.eos_id,
        "pad_token_id": spec.pad_id, "bos_token_id": spec.bos_id, "torch_dtype": dtype_name, "use_cache": False,
    }
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "mask_token_id", "pad_token_id")}
    return cfg, gen


def save_checkpoint(model: DiffusionLM, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                    max_shard_bytes: int | None = None) -> Path:
    """Write weights (sharded with an index when they exceed max_shard_bytes) and config files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = published_names(model.spec)
    params = dict(model.named_parameters())
    tensors = {names[k]: params[k].detach().to(dtype).contiguous().cpu() for k in names}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg, gen = published_config(model.spec, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if gen is not None:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def random_model(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """A randomly initialised model (tests and benchmarks of per-step cost at a realistic width)."""
    g = torch.Generator().manual_seed(seed)
    model = DiffusionLM(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
    return model.to(dtype).eval()
