"""Training recipe of the bundled `tiny-task` model (LLaDA layout) on long-answer synthetic tasks.

    diffuserve train task --out models/tiny-task [--steps N] [--work DIR]
    python -m diffuserve.tools.train.tiny_task --card models/tiny-task --quality QUALITY.json \
        [--quality-float32 Q32.json]
        [--rerun DIR]
        # the card, with bench.quality's report and a from-scratch rerun of the training command
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from diffuserve.engine.model import ForwardBatch, ModelSpec
from diffuserve.engine.model.saver import random_model, save_checkpoint
from . import task_data as tk
from .objective import aligned
from .trainer import TrainConfig, config_dict, native_bf16, train

TOKENS_PER_STEP = 4096


def task_spec(family: str = "llada") -> ModelSpec:
    """LLaDA layout, or Dream's (shifted logits and q/k/v biases, as Qwen2's; Dream's config names no end-of-turn
    token, and the task's chat template uses none) for `tiny-task-dream`."""
    return ModelSpec(family=family, vocab_size=tk.vocab_size(), hidden_size=192, num_layers=6, num_heads=3,
                     num_kv_heads=3, intermediate_size=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                     qkv_bias=family == "dream",
                     max_positions=2048, mask_id=tk.MASK, eos_id=tk.EOS, pad_id=tk.EOS, bos_id=tk.BOS,
                     eot_id=tk.EOT if family == "llada" else None)


def make_eval(seed: int = 4242):
    """Masked-token accuracy at half masking on held-out rows: a cheap progress signal (bench.quality is the
    real evaluation: it decodes answers and checks them)."""
    batches = tk.TaskBatches(TOKENS_PER_STEP, seed=seed, split=0.0)  # whole answers, comparable across designs
    ids, region, _ = batches(0)
    g = torch.Generator().manual_seed(seed)
    masked = (torch.rand(ids.shape, generator=g) < 0.5) & region
    noisy = torch.where(masked, torch.full_like(ids, tk.MASK), ids)

    @torch.inference_mode()
    def evaluate(model) -> dict:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        pred = aligned(model, model.forward(ForwardBatch(ids=noisy, positions=pos))).argmax(-1)
        answer = masked & (ids != tk.EOS)
        return {"masked_acc": round(float((pred == ids)[masked].float().mean()), 4),
                "masked_answer_acc": round(float((pred == ids)[answer].float().mean()), 4)}

    return evaluate


def run(out: Path, work: Path, steps: int, seed: int = 0, family: str = "llada") -> dict:
    t0 = time.monotonic()
    tok_dir = work / "tokenizer"
    tk.write_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = random_model(task_spec(family), seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=0, lr=3e-3, warmup=150, seed=seed, eval_every=max(50, steps // 8))
    log = train(model, tk.TaskBatches(TOKENS_PER_STEP, seed=seed), cfg, work / "ckpt", make_eval(),
                autocast_bf16=native_bf16())
    save_checkpoint(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    record = {"recipe": "diffuserve.tools.train.tiny_task", "train_config": config_dict(cfg),
              "tokens_per_step": TOKENS_PER_STEP, "params": sum(p.numel() for p in model.parameters()),
              "autocast_bf16": native_bf16(), "wall_time_s": round(time.monotonic() - t0), "family": family,
              "log": log}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    write_task_card(out)
    return record


DATA_NOTE = ("Synthetic chat tasks generated on the fly (`tools/train/task_data.py`), a fresh draw every step; the "
             "held-out set is a separately seeded draw. Numbers 0..419 are four residue tokens, mod 7, 5, 4 and 3 "
             "(47 is \"w5 x2 y3 z2\"), so counting down has no borrow. "
             "`count` (deterministic, exact match): \"count down from A\" -> \"A , A-1 , ... , 0\", 5 to 204 "
             "numbers. `sentences` (many valid answers, checked by a parser): \"write sentences down from N\" -> N+1 "
             "sentences \"DET ADJ NOUN VERB ADV : k .\" numbered N down to 0, with any words of each category. "
             "Each training step draws one canvas of 64, 128, 256, 512 or 1024 positions (4 steps in 7 are 64 or 128: "
             "long rows alone did not teach the local counting rule); answer lengths are uniform up to what the "
             "canvas holds (so the number of masks does not give the length away), then EOS to its end. Half the rows "
             "are continuations shaped like one semi-autoregressive step: a prefix of the answer is given with the "
             "prompt (none in a quarter of them), up to 64 tokens after it are noised and the rest is always masked. "
             "A quarter of the steps are cut rows, as a pruned window shows a request: the row ends mid-answer, "
             "with no EOS fill; so are 40% of the rows of the other steps on canvases up to 512, so that numbers over "
             "127 are as common on short rows as short ones (a canvas holds an answer only up to its size), and a "
             "quarter of the short cut rows noise the answer from its first number with the rest masked. The loss "
             "covers the answer (less any given prefix) and its EOS fill, never the prompt. "
             "Held-out answers are 128 to 1023 tokens (shorter draws are skipped) on 256, 512 or 1024-position "
             "canvases.")

# bench.quality's defaults: 40 examples, blocks of 32, and the checkpoint's own dtype (bf16, --dtype auto). On CPUs
# with AMX / AVX512-BF16 a 1040-position forward is also 5x faster in bf16 than in float32 (0.021 s vs 0.105 s).
QUALITY_COMMAND = "python -m bench.quality --model {name} --method vanilla --json"
NAMES = {"llada": ("tiny-task", "task"), "dream": ("tiny-task-dream", "task-dream")}  # family -> model, recipe


def quality_lines(quality: dict) -> dict:
    """bench.quality's per-task report as card lines: exact match for deterministic tasks, validity otherwise."""
    lines = {}
    for task, row in quality["tasks"].items():
        metric = "exact_match" if task in tk.DETERMINISTIC else "validity"
        lines[f"{task} {metric}"] = (f"{row[metric]:.1%} of {row['n']} (answers {row['min_answer_tokens']}-"
                                     f"{row['max_answer_tokens']} tokens, mean {row['mean_answer_tokens']})")
    return lines


def write_task_card(out: Path, quality: dict | None = None, rerun: tuple[Path, dict] | None = None,
                    quality_fp32: dict | None = None) -> None:
    """The model card from train_log.json, with bench.quality's report (QUALITY_COMMAND) when given, the same in
    float32, and a from-scratch rerun of the same training command (its output directory and bench.quality report)."""
    from .card import write_card

    record = json.loads((out / "train_log.json").read_text())
    family = record.get("family", "llada")
    name, recipe = NAMES[family]
    evals = [e["eval"] for e in record["log"] if "eval" in e]
    scores = {f"final {k} (half the answer masked)": v for k, v in (evals[-1] if evals else {}).items()}
    if quality is not None:
        scores["bench.quality command"] = f"`{QUALITY_COMMAND.format(name=name)}`"
        scores.update(quality_lines(quality))
        scores["vanilla forward passes"] = quality["forward_passes"]
        scores["vanilla wall time"] = f"{quality['wall_time_s']:.0f} s"
    if quality_fp32 is not None:
        scores["the same in float32 (`--dtype float32`)"] = "; ".join(
            f"{k} {v}" for k, v in quality_lines(quality_fp32).items()) + f"; {quality_fp32['wall_time_s']:.0f} s"
    if rerun is not None:
        rerun_dir, q = rerun
        rec = json.loads((rerun_dir / "train_log.json").read_text())
        digests = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (out, rerun_dir)]
        line = (f"the training command rerun from scratch took {rec['wall_time_s'] / 60:.1f} minutes and wrote "
                + ("bit-identical weights (model.safetensors sha256 " + digests[0][:16] + "...), so the scores above "
                   "are its scores" if digests[0] == digests[1] else "different weights"))
        if q is not None:
            line += "; bench.quality on it: " + "; ".join(f"{k} {v}" for k, v in quality_lines(q).items())
        scores["reproduction"] = line
    layout = ("in the LLaDA layout like tiny-text" if family == "llada" else
              "in the Dream layout (shifted logits: position p is predicted by output row p - 1; q/k/v biases), "
              "trained exactly as tiny-task otherwise, so the Dream-family methods are measured on answers too")
    write_card(out, name, "A small masked-diffusion LM trained on synthetic tasks with long answers and exact "
               "checkers, so every acceleration's effect on quality can be measured exactly (bench.quality) at "
               f"canvases up to 1024 positions, {layout}.", DATA_NOTE,
               f"diffuserve train {recipe} --out {out} --steps {record['train_config']['steps']}", record, scores, [])


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write tiny-task's model card")
    ap.add_argument("--card", required=True, help="the trained model directory")
    ap.add_argument("--quality", help="bench.quality --json output to include")
    ap.add_argument("--quality-float32", help="bench.quality --json --dtype float32 output to include")
    ap.add_argument("--rerun", help="a from-scratch rerun's output directory (train_log.json, model.safetensors)")
    ap.add_argument("--rerun-quality", help="bench.quality --json output of the rerun's model")
    args = ap.parse_args(argv)

    def read_json(path):  # bench.quality prints progress before its JSON line
        return json.loads(Path(path).read_text().strip().splitlines()[-1])

    quality = read_json(args.quality) if args.quality else None
    rerun_q = read_json(args.rerun_quality) if args.rerun_quality else None
    rerun = (Path(args.rerun), rerun_q) if args.rerun else None
    fp32 = read_json(args.quality_float32) if args.quality_float32 else None
    write_task_card(Path(args.card), quality, rerun, fp32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
