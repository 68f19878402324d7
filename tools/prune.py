"""Offline weight pruning: magnitude, Wanda and sink-aware Wanda (ALGORITHMS.md section 5), one calibration pass.

    diffuserve prune --model DIR --sparsity 0.5 --method {magnitude,wanda,sink-aware}
                     [--structure unstructured|2:4] --out DIR [--calib task|FILE] [--samples N]

Every Linear of every layer (attention and MLP projections; not the embedding or the LM head) is scored weight by
weight and the lowest-scoring fraction of each output row is zeroed (Wanda's per-output grouping; with 2:4, the 2
lowest of every 4 consecutive inputs). Scores:
- magnitude: |W|.
- wanda: |W| * ||X_c||, the L2 norm of input feature c over every calibration token.
- sink-aware: |W| * sum over (sample, noise level) of ||X_c * (1 - phi)||, where phi is a soft attention-sink score
  per token, sigmoid(alpha * (m - (mean(m) + kappa * std(m)))), m being the attention mass each key receives summed
  over heads, queries and layers. Tokens that soak up attention (sinks, which in diffusion LMs move as decoding
  proceeds) then count less when deciding which weights matter.
Calibration is masked-diffusion input: each sample is noised at t = 0.1, 0.2, ..., 1.0 (each loss-region token
MASK with probability (1 - eps) t + eps), as the model sees it while decoding. The statistics come from the dense
model in one pass (as the authors' sink-aware code does), not layer by layer.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffuserve.engine.model import DiffusionLM, load_model
from .train.objective import corrupt

METHODS = ("magnitude", "wanda", "sink-aware")
STRUCTURES = ("unstructured", "2:4")
NOISE_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 11))
SINK_STD, SINK_ALPHA = 2.0, 5.0  # kappa and alpha, the authors' defaults


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.5
    method: str = "sink-aware"
    structure: str = "unstructured"
    samples: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; known: {', '.join(STRUCTURES)}")
        if self.structure == "2:4" and self.sparsity != 0.5:
            raise ValueError("2:4 structure means exactly 50% sparsity")
        if not 0 < self.sparsity < 1:
            raise ValueError("sparsity must be in (0, 1)")


def prunable(model: DiffusionLM) -> dict[str, nn.Linear]:
    return {f"layers.{i}.{n}": m for i, layer in enumerate(model.layers) for n, m in layer.named_children()
            if isinstance(m, nn.Linear)}


def attention_probs(model: DiffusionLM, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One layer's attention probabilities [B, heads, Tq, Tk] from its q/k projections ([B, T, H] each), rotated
    and grouped exactly as the forward does (every key visible)."""
    s = model.spec
    B, T = positions.shape
    cos, sin = model.rope.tables(positions, torch.float32, True)  # [B, 1, T, hd]
    # [B, T, heads * hd] -> [B, heads, T, hd]
    q = model.rope.apply(q.float().view(B, T, s.num_heads, s.head_dim).transpose(1, 2), cos, sin)
    k = model.rope.apply(k.float().view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(s.num_heads // s.num_kv_heads, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(s.head_dim), dim=-1)


def sink_scores(model: DiffusionLM, qk: dict[int, list[torch.Tensor]], positions: torch.Tensor) -> torch.Tensor:
    """phi [B, T]: each token's soft sink score from every layer's captured q/k projections."""
    mass = sum(attention_probs(model, q, k, positions).sum(dim=(1, 2)) for q, k in qk.values())  # [B, Tk]
    bar = mass.mean(-1, keepdim=True) + SINK_STD * mass.std(-1, keepdim=True)
    return torch.sigmoid(SINK_ALPHA * (mass - bar))


@torch.inference_mode()
def calibrate(model: DiffusionLM, ids: torch.Tensor, region: torch.Tensor, method: str, seed: int = 0,
              batch: int = 4, out=None) -> dict[str, torch.Tensor]:
    """Per prunable Linear, the per-input-feature activation statistic its score multiplies |W| by."""
    out = out or sys.stderr
    layers = prunable(model)
    stats = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in layers.items()}
    inputs: dict[str, torch.Tensor] = {}
    qk: dict[int, list[torch.Tensor]] = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
             for name, lin in layers.items()]
    for i, layer in enumerate(model.layers):
        qk[i] = [None, None]
        hooks.append(layer.q_proj.register_forward_hook(lambda m, a, y, i=i: qk[i].__setitem__(0, y)))
        hooks.append(layer.k_proj.register_forward_hook(lambda m, a, y, i=i: qk[i].__setitem__(1, y)))
    gen = torch.Generator().manual_seed(seed)
    try:
        total, done = len(NOISE_LEVELS) * ids.shape[0], 0
        for t in NOISE_LEVELS:
            for lo in range(0, ids.shape[0], batch):
                x, r = ids[lo:lo + batch], region[lo:lo + batch]
                noisy, _, _ = corrupt(x, r, model.spec.mask_id, gen, t=torch.full((x.shape[0],), t))
                model.logits(noisy)
                weight = None
                if method == "sink-aware":
                    weight = 1 - sink_scores(model, qk, torch.arange(x.shape[1]).expand_as(x))  # [B, T]
                for name, X in inputs.items():  # X [B, T, in]
                    X = X.double()
                    if weight is None:
                        stats[name] += X.pow(2).sum(dim=(0, 1))  # squared norms, rooted at the end (Wanda)
                    else:
                        stats[name] += (X * weight[..., None].double()).norm(dim=1).sum(0)  # summed L2 norms
                done += x.shape[0]
            print(f"calibration {done}/{total} (noise level {t})", file=out, flush=True)
    finally:
        for h in hooks:
            h.remove()
    if method == "wanda":
        stats = {k: v.sqrt() for k, v in stats.items()}
    return {k: v.float() for k, v in stats.items()}


def prune_mask(score: torch.Tensor, sparsity: float, structure: str) -> torch.Tensor:
    """score [out, in] -> bool keep mask: per output row the lowest `sparsity` share (or 2 of every 4) is dropped."""
    if structure == "2:4":
        groups = score.reshape(score.shape[0], -1, 4)  # [out, in/4, 4]
        drop = groups.argsort(dim=-1)[..., :2]
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(score.shape)
    k = int(score.shape[1] * sparsity)
    drop = score.argsort(dim=1)[:, :k]
    return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)


@torch.inference_mode()
def prune_model(model: DiffusionLM, cfg: PruneConfig, stats: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Zero weights in place; returns each pruned Linear's measured sparsity."""
    measured = {}
    for name, lin in prunable(model).items():
        if cfg.structure == "2:4" and lin.in_features % 4:
            raise ValueError(f"{name} has {lin.in_features} inputs, not a multiple of 4 as 2:4 needs")
        score = lin.weight.abs().float()
        if stats is not None:
            score = score * stats[name][None, :]
        lin.weight.mul_(prune_mask(score, cfg.sparsity, cfg.structure).to(lin.weight.dtype))
        measured[name] = float((lin.weight == 0).float().mean())
    return measured


def measured_sparsity(model: DiffusionLM) -> float:
    """Zeros among all prunable weights."""
    ws = [lin.weight for lin in prunable(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def save_pruned(model: DiffusionLM, src: Path, out: Path) -> None:
    """The pruned weights in the source's dtype, beside copies of its config and tokenizer files."""
    from diffuserve.engine.model.saver import save_checkpoint

    dtype = next(iter(model.parameters())).dtype
    save_checkpoint(model, out, dtype if dtype != torch.float32 else torch.bfloat16)
    for f in src.iterdir():
        keep = f.suffix in (".json", ".txt", ".model", ".jinja") and not f.name.endswith(".index.json")
        if f.is_file() and keep and f.name not in ("train_log.json",):
            shutil.copyfile(f, out / f.name)


def load(model_dir: Path) -> DiffusionLM:
    return load_model(model_dir, torch.float32)


def calibration_rows(model_dir: Path, model: DiffusionLM, source: str, samples: int, seed: int,
                     seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, loss region) [samples, L]: 'task' draws tiny-task chat rows (the answer is the region); a text file
    gives random seq_len-token windows of it, all in the region (pre-training style, as the authors' wikitext)."""
    import random

    rng = random.Random(seed)
    if source == "task":
        from .train import task_data as tk

        if model.spec.vocab_size != tk.vocab_size():
            raise ValueError("--calib task needs tiny-task's vocabulary; give a text file for this model")
        return tk.TaskBatches(0, split=0.0).rows(rng, seq_len, samples)[:2]
    from diffuserve.engine.model.tokenizer import load_tokenizer

    text = Path(source).read_text(encoding="utf-8")
    ids = load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len + 1:
        raise ValueError(f"{source} has {len(ids)} tokens; calibration needs more than {seq_len}")
    starts = [rng.randrange(len(ids) - seq_len) for _ in range(samples)]
    rows = torch.tensor([ids[s:s + seq_len] for s in starts])
    return rows, torch.ones_like(rows, dtype=torch.bool)


@torch.inference_mode()
def heldout_scores(model: DiffusionLM, ids: torch.Tensor, region: torch.Tensor, seed: int = 1) -> dict:
    """Cheap quality on held-out rows: masked-token accuracy at half masking and the masked-diffusion ELBO."""
    from .train.objective import elbo

    noisy, masked, _ = corrupt(ids, region, model.spec.mask_id, torch.Generator().manual_seed(seed),
                               t=torch.full((ids.shape[0],), 0.5))
    pred = model.logits(noisy).argmax(-1)
    return {"masked_token_accuracy": round(float((pred == ids)[masked].float().mean()), 4),
            "elbo_nats_per_token": round(float(elbo(model, ids, region, samples=4, seed=seed).mean()), 4)}


def run(model_dir: Path, out: Path, cfg: PruneConfig, calib: str = "task", log=None) -> dict:
    """Prune a checkpoint directory into `out`; returns the report (sparsity, held-out scores before and after)."""
    log = log or sys.stderr
    model = load(model_dir)
    ids, region = calibration_rows(model_dir, model, calib, cfg.samples, cfg.seed)
    held_ids, held_region = calibration_rows(model_dir, model, calib, 16, cfg.seed + 1)
    before = heldout_scores(model, held_ids, held_region)
    stats = None if cfg.method == "magnitude" else calibrate(model, ids, region, cfg.method, cfg.seed, out=log)
    per_layer = prune_model(model, cfg, stats)
    save_pruned(model, model_dir, out)
    reloaded = load(out)  # measure what was written, not what is in memory
    report = {"model": str(model_dir), "out": str(out), "method": cfg.method, "structure": cfg.structure,
              "target_sparsity": cfg.sparsity, "measured_sparsity": round(measured_sparsity(reloaded), 4),
              "min_layer_sparsity": round(min(per_layer.values()), 4), "calibration": calib,
              "calibration_samples": cfg.samples, "heldout_before": before,
              "heldout_after": heldout_scores(reloaded, held_ids, held_region)}
    return report


def decoded_quality(model_dir: Path, method: str, n: int, seed: int = 0) -> dict:
    """The held-out task evaluation (decoded answers, exact checkers; tools.evaluate) of one checkpoint."""
    from .evaluate import eval_task
    from diffuserve.engine.llm import LLM

    scores = eval_task(LLM(str(model_dir)), method, {}, n, seed)
    return {task: {k: v for k, v in row.items() if k in ("n", "exact_match", "validity")}
            for task, row in scores["tasks"].items()} | {"forward_passes": scores["forward_passes"]}
