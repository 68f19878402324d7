"""ModelSpec: the architecture facts of a checkpoint, read once from its published config.json.

Both diffusion-LM families are pre-norm, RoPE, SwiGLU transformers with bidirectional attention; they differ in
key names, GQA, QKV bias, how RoPE rounds, and whether logits are shifted. Everything the runtime and the decoders
need to know about those differences lives here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LLADA = "llada"
DREAM = "dream"


@dataclass(frozen=True)
class ModelSpec:
    family: str  # LLADA or DREAM
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    max_positions: int
    mask_id: int
    eos_id: int
    pad_id: int | None
    bos_id: int | None
    eot_id: int | None  # LLaDA's <|eot_id|>; None where the family has none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def shifted_logits(self) -> bool:
        """Dream predicts position p from output row p-1 (it was adapted from an AR model)."""
        return self.family == DREAM

    @property
    def stop_ids(self) -> tuple[int, ...]:
        ids = [self.eos_id] + ([self.eot_id] if self.eot_id is not None else [])
        return tuple(dict.fromkeys(ids))


def _family(cfg: dict) -> str:
    model_type = str(cfg.get("model_type", "")).lower()
    archs = " ".join(cfg.get("architectures") or []).lower()
    if model_type == "llada" or "llada" in archs or "d_model" in cfg:
        return LLADA
    if model_type == "dream" or "dream" in archs:
        return DREAM
    raise ValueError(f"unsupported model_type {cfg.get('model_type')!r} (expected LLaDA or Dream)")


def _llada_spec(cfg: dict) -> ModelSpec:
    if cfg.get("block_type", "llama") != "llama":
        raise ValueError(f"LLaDA block_type {cfg.get('block_type')!r} is not supported (only 'llama')")
    if cfg.get("alibi") or not cfg.get("rope", True):
        raise ValueError("LLaDA checkpoints without RoPE (alibi) are not supported")
    if cfg.get("weight_tying"):
        raise ValueError("LLaDA checkpoints with tied embeddings are not supported")
    n_heads = int(cfg["n_heads"])
    n_kv = cfg.get("n_kv_heads") or n_heads
    hidden = cfg.get("mlp_hidden_size") or int(cfg["mlp_ratio"]) * int(cfg["d_model"])
    return ModelSpec(
        family=LLADA,
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        hidden_size=int(cfg["d_model"]),
        num_layers=int(cfg["n_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        intermediate_size=int(hidden),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(cfg.get("include_bias") or cfg.get("include_qkv_bias")),
        max_positions=int(cfg.get("max_sequence_length", 4096)),
        mask_id=int(cfg.get("mask_token_id", 126336)),
        eos_id=int(cfg.get("eos_token_id", 126081)),
        pad_id=cfg.get("pad_token_id"),
        bos_id=cfg.get("bos_token_id", 126080),
        eot_id=int(cfg.get("eot_token_id", 126348)),
    )


def _dream_spec(cfg: dict, gen_cfg: dict) -> ModelSpec:
    merged = {**cfg, **{k: v for k, v in gen_cfg.items() if v is not None}}
    if (cfg.get("rope_scaling") or None) is not None:
        raise ValueError("Dream rope_scaling is not supported")
    return ModelSpec(
        family=DREAM,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
        mask_id=int(merged.get("mask_token_id", 151666)),
        eos_id=int(merged.get("eos_token_id", 151643)),
        pad_id=merged.get("pad_token_id"),
        bos_id=merged.get("bos_token_id"),
        eot_id=None,
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: a model directory needs the published config.json")
    cfg = json.loads(cfg_path.read_text())
    family = _family(cfg)
    if family == LLADA:
        return _llada_spec(cfg)
    gen_path = model_dir / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return _dream_spec(cfg, gen_cfg)
