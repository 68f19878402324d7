"""tiny-task's synthetic tasks: long answers with exact checkers.

Every task is a chat turn (user: an instruction with its arguments; assistant: the answer, then EOS to the end of
the canvas). Tokens are words of a fixed vocabulary (digits are single tokens), so answers of 128 to 900 tokens
are cheap to generate and to check.

- `count` (deterministic): "count from A to B by S" -> "A , A+S , ... , B". One right answer.
- `sentences` (many answers): "write N sentences" -> "1 : DET ADJ NOUN VERB ADV . 2 : ..." with any words of each
  category; valid when every sentence parses and they are numbered 1..N.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|mask|>", "<|eot_id|>", "<|user|>", "<|assistant|>"]
EOS, BOS, MASK, EOT, USER, ASSISTANT = range(len(SPECIALS))
GRAMMAR = {
    "DET": ["the", "a", "one", "every", "some", "that"],
    "ADJ": ["red", "big", "small", "old", "quick", "lazy", "green", "happy", "quiet", "bright"],
    "NOUN": ["cat", "dog", "bird", "fox", "king", "ship", "tree", "child", "horse", "star"],
    "VERB": ["runs", "sings", "sleeps", "jumps", "waits", "falls", "grows", "shines", "swims", "hides"],
    "ADV": ["fast", "slowly", "well", "early", "late", "often", "gladly", "there", "again", "softly"],
}
PATTERN = ["DET", "ADJ", "NOUN", "VERB", "ADV", "."]
WORDS = (list("0123456789") + [",", ".", ":", "count", "from", "to", "by", "write", "sentences"]
         + sorted({w for ws in GRAMMAR.values() for w in ws}))
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def digits(n: int) -> list[str]:
    return list(str(n))


@dataclass(frozen=True)
class Example:
    task: str
    prompt: list[str]  # the user turn's words
    answer: list[str]  # one valid answer (the only one for deterministic tasks)


def make_count(rng: random.Random, max_answer: int) -> Example:
    while True:
        step = rng.choice([1, 1, 1, 2, 3, 5])
        start = rng.randint(0, 600)
        n = rng.randint(20, 220)
        end = start + step * (n - 1)
        answer = []
        for k in range(n):
            answer += digits(start + k * step) + ([","] if k < n - 1 else [])
        if 128 <= len(answer) <= max_answer or (len(answer) < 128 and rng.random() < 0.15):
            prompt = ["count", "from"] + digits(start) + ["to"] + digits(end) + ["by"] + digits(step)
            return Example("count", prompt, answer)


def make_sentences(rng: random.Random, max_answer: int) -> Example:
    n = rng.randint(12, min(60, max_answer // 9))
    answer = []
    for k in range(1, n + 1):
        answer += digits(k) + [":"] + [w if w == "." else rng.choice(GRAMMAR[w]) for w in PATTERN]
    return Example("sentences", ["write"] + digits(n) + ["sentences"], answer)


TASKS = {"count": make_count, "sentences": make_sentences}


def check_count(prompt: list[str], answer: list[str]) -> bool:
    """Exact match with the one right answer."""
    text = " ".join(prompt).replace(" ", "")
    start, rest = text.removeprefix("countfrom").split("to")
    end, step = rest.split("by")
    want = []
    for v in range(int(start), int(end) + 1, int(step)):
        want += digits(v) + [","]
    return answer == want[:-1]


def check_sentences(prompt: list[str], answer: list[str]) -> bool:
    """Valid when the answer is exactly N numbered sentences, each DET ADJ NOUN VERB ADV '.'."""
    n = int("".join(prompt[1:-1]))
    pos = 0
    for k in range(1, n + 1):
        label = digits(k) + [":"]
        if answer[pos:pos + len(label)] != label:
            return False
        pos += len(label)
        for cat in PATTERN:
            if pos >= len(answer) or (answer[pos] != "." if cat == "." else answer[pos] not in GRAMMAR[cat]):
                return False
            pos += 1
    return pos == len(answer)


CHECKERS = {"count": check_count, "sentences": check_sentences}
DETERMINISTIC = {"count"}


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the task vocabulary (whitespace-separated), with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
           "additional_special_tokens": SPECIALS[3:], "chat_template": CHAT_TEMPLATE, "model_max_length": 2048,
           "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


class TaskBatches:
    """batch(step) -> (ids [B, L], loss region [B, L]) with a fixed token budget per step.

    Each step picks one canvas length (256, 512 or 1024 positions after the prompt, at least the answer + 1) so the
    model learns to end an answer with EOS whatever the canvas size; only the answer and its EOS fill are in the loss.
    """

    LENGTHS = (256, 512, 1024)

    def __init__(self, tokens_per_step: int, seed: int = 0, prompt_pad: int = 24):
        self.budget, self.seed, self.prompt_pad = tokens_per_step, seed, prompt_pad
        self.ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}

    def encode(self, words: list[str]) -> list[int]:
        return [self.ids[w] for w in words]

    def prompt_ids(self, ex: Example) -> list[int]:
        return [BOS, USER] + self.encode(ex.prompt) + [EOT, ASSISTANT]

    def __call__(self, step: int):
        import torch

        rng = random.Random(self.seed * 104_729 + step)
        canvas = rng.choice(self.LENGTHS)
        total = self.prompt_pad + canvas
        rows, regions = [], []
        for _ in range(max(1, self.budget // total)):
            task = rng.choice(sorted(TASKS))
            ex = TASKS[task](rng, canvas - 1)
            head = self.prompt_ids(ex)
            # Left-pad the prompt with EOS (outside the loss) so every row has the same length.
            head = [EOS] * (self.prompt_pad - len(head)) + head
            body = (self.encode(ex.answer) + [EOS] * canvas)[:canvas]
            rows.append(head + body)
            regions.append([False] * len(head) + [True] * canvas)
        return torch.tensor(rows), torch.tensor(regions)


def heldout(n: int, seed: int = 99991, max_answer: int = 1023) -> list[Example]:
    """A fixed, seeded evaluation set, alternating tasks (disjoint in practice from training draws)."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    return [TASKS[names[i % len(names)]](rng, max_answer) for i in range(n)]
