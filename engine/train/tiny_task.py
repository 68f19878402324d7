"""Training recipe of the bundled `tiny-task` model (LLaDA layout) on long-answer synthetic tasks.

    diffuserve train task --out models/tiny-task [--steps N] [--work DIR]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..model import ForwardBatch, ModelSpec
from ..model.saver import random_model, save_checkpoint
from . import task_data as tk
from .trainer import TrainConfig, config_dict, native_bf16, train

TOKENS_PER_STEP = 4096


def task_spec() -> ModelSpec:
    return ModelSpec(family="llada", vocab_size=tk.vocab_size(), hidden_size=192, num_layers=6, num_heads=3,
                     num_kv_heads=3, intermediate_size=512, rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False,
                     max_positions=2048, mask_id=tk.MASK, eos_id=tk.EOS, pad_id=tk.EOS, bos_id=tk.BOS,
                     eot_id=tk.EOT)


def make_eval(seed: int = 4242):
    """Masked-token accuracy at half masking on held-out rows: a cheap progress signal (bench.quality is the
    real evaluation: it decodes answers and checks them)."""
    batches = tk.TaskBatches(TOKENS_PER_STEP, seed=seed)
    ids, region = batches(0)
    g = torch.Generator().manual_seed(seed)
    masked = (torch.rand(ids.shape, generator=g) < 0.5) & region
    noisy = torch.where(masked, torch.full_like(ids, tk.MASK), ids)

    @torch.inference_mode()
    def evaluate(model) -> dict:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        pred = model.forward(ForwardBatch(ids=noisy, positions=pos)).argmax(-1)
        answer = masked & (ids != tk.EOS)
        return {"masked_acc": round(float((pred == ids)[masked].float().mean()), 4),
                "masked_answer_acc": round(float((pred == ids)[answer].float().mean()), 4)}

    return evaluate


def run(out: Path, work: Path, steps: int, seed: int = 0) -> dict:
    t0 = time.monotonic()
    tok_dir = work / "tokenizer"
    tk.write_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = random_model(task_spec(), seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=0, lr=3e-3, warmup=150, seed=seed, eval_every=max(50, steps // 8))
    log = train(model, tk.TaskBatches(TOKENS_PER_STEP, seed=seed), cfg, work / "ckpt", make_eval(),
                autocast_bf16=native_bf16())
    save_checkpoint(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    record = {"recipe": "engine.train.tiny_task", "train_config": config_dict(cfg),
              "tokens_per_step": TOKENS_PER_STEP, "params": sum(p.numel() for p in model.parameters()),
              "wall_time_s": round(time.monotonic() - t0), "log": log}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    return record
