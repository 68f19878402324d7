"""tiny-task's synthetic tasks: long answers with exact checkers.

Every task is a chat turn (user: an instruction ending in a number; assistant: the answer, then EOS to the end of
the canvas). Tokens are words of a fixed vocabulary. A number is three place tokens, hundreds, tens and units:
47 is "h0 t4 u7". Both tasks count DOWN from the prompt's number to "h0 t0 u0", and the chat template puts exactly
one token (<|assistant|>) between that number and the answer, where a comma sits between two numbers: the answer's
first number follows from the prompt by the very rule that links every later number to the one before it, and the
end (after zero) is local too.

Why place tokens: each digit of the next number is then the nearest token of its own place to the left (units one
less, a borrow when the units were u0), a lookup by content, where plain digits "0 4 7" made it the digit exactly
four positions back among other digits, a sharp positional pattern the small model had not formed after 2,500
steps (it then copied the nearest digit of any place).

Earlier designs and what they taught us (details in the issue notes): with variable-width numbers the first model
misaligned carries; with one token per number a second sat near chance on counting; with "count from A to B" a third
never learned to read A or B from the prompt. Probing the fourth, trained on whole answers only: with the numbers
left of a position visible and everything right of it masked, it predicted the next number 0 of 30 times; it filled
gaps between visible numbers and counted from the EOS boundary on the right, which uniform masking nearly always
leaves partly visible and semi-autoregressive decoding never does. So half the rows are continuations
(`TaskBatches.split`): a random prefix of the answer is given with the prompt, the next few tokens are noised and
everything after them is masked, as a semi-autoregressive block sees it.

- `count` (deterministic): "count down from A" -> "A , A-1 , ... , 0". One right answer.
- `sentences` (many answers): "write sentences down from N" -> N+1 sentences "k : DET ADJ NOUN VERB ADV ."
  numbered N down to 0, with any words of each category; valid when every sentence parses and the numbering is
  right.

Both answers begin with the prompt's own number. They began with A-1 until the 6000-step v9 model: its probes
gave the next number from the left 30 of 30 times, and each of the three bench.quality failures decoded again
went wrong at the first number only (168 -> "157 , 156 , ...", 31 -> "20 : ...", 45 -> "34 : ..."; confidence
0.96 on one): one subtraction with a borrow, seen once per row, where every later number is the one to its left
less one. The 6000-step v10 model (this format) still failed bench.quality at the first number, and probes showed
why: with only one number masked and the whole right answer around it, it got the tens or hundreds wrong 4 times in
82 in mid-answer and 16 in 82 at the first number, nearly all at numbers over 100. A canvas holds an answer only up
to its size, so the short rows that teach the local rules counted down from small numbers only; cut rows now make up
part of every step (`TaskBatches.WIDE`), so large numbers are seen on every canvas.
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
MAX_NUMBER = 999
MAX_ANSWER = 1023  # tokens: the longest answer any task writes (1024-position canvases)
PLACES = "htu"  # hundreds, tens, units
WORDS = ([f"{p}{d}" for p in PLACES for d in range(10)] + [",", ".", ":", "count", "down", "from", "write", "sentences"]
         + sorted({w for ws in GRAMMAR.values() for w in ws}))
# No end-of-turn token: <|assistant|> alone separates the prompt's last number from the answer (see above).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def num(n: int) -> list[str]:
    """A number as its three place tokens: 47 -> ["h0", "t4", "u7"]."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"{n} is outside 0..{MAX_NUMBER}")
    return [f"{p}{d}" for p, d in zip(PLACES, f"{n:03d}")]


def value(places: list[str]) -> int:
    """The inverse of num(); a malformed number is -1 (never a valid count)."""
    if len(places) != 3 or any(len(w) != 2 or w[0] != p or not w[1].isdigit() for w, p in zip(places, PLACES)):
        return -1
    return int("".join(w[1] for w in places))


@dataclass(frozen=True)
class Example:
    task: str
    prompt: list[str]  # the user turn's words
    answer: list[str]  # one valid answer (the only one for deterministic tasks)


def _length(rng: random.Random, lo: int, hi: int, short: int, uniform: bool = False) -> int:
    """Item counts: mostly lo..hi, some shorter so short requests end cleanly too (and at most hi on a canvas too
    small for lo). uniform (training): any of short..hi alike, so that the canvas size says nothing about the answer's
    length beyond bounding it; with "mostly lo..hi" the model read the length off the number of masks (a 128-canvas
    row was nearly always 32 numbers) instead of off the prompt, and a pruned window, which shows few masks, then
    got very short answers."""
    if uniform:
        return rng.randint(short, hi)
    return rng.randint(short, min(lo - 1, hi)) if rng.random() < 0.15 or hi < lo else rng.randint(lo, hi)


NUMBER = 4  # tokens per counted number: three digits and a comma
SENTENCE = 4 + len(PATTERN)  # "d d d :" then the pattern (its last word is ".")


def count_answer(start: int) -> list[str]:
    """The one right answer of "count down from start": start , start-1 , ... , 0."""
    answer = []
    for v in range(start, -1, -1):
        answer += num(v) + ([","] if v else [])
    return answer


def make_count(rng: random.Random, max_answer: int, uniform: bool = False) -> Example:
    # n numbers, 4n - 1 tokens: 127..1023
    n = _length(rng, 32, min(256, (max_answer + 1) // NUMBER), short=5, uniform=uniform)
    return Example("count", ["count", "down", "from", *num(n - 1)], count_answer(n - 1))


def make_sentences(rng: random.Random, max_answer: int, uniform: bool = False) -> Example:
    n = _length(rng, 13, min(102, max_answer // SENTENCE), short=3, uniform=uniform)  # 10n tokens: 130..1020
    answer = []
    for k in range(n - 1, -1, -1):
        answer += num(k) + [":"] + [w if w == "." else rng.choice(GRAMMAR[w]) for w in PATTERN]
    return Example("sentences", ["write", "sentences", "down", "from", *num(n - 1)], answer)


TASKS = {"count": make_count, "sentences": make_sentences}


def check_count(prompt: list[str], answer: list[str]) -> bool:
    """Exact match with the one right answer."""
    start = value(prompt[3:6])
    return start >= 0 and answer == count_answer(start)


def check_sentences(prompt: list[str], answer: list[str]) -> bool:
    """Valid when the answer is exactly N+1 sentences numbered N down to 0, each DET ADJ NOUN VERB ADV '.'."""
    n = value(prompt[4:7]) + 1  # sentences
    if n < 1 or len(answer) != n * SENTENCE:
        return False
    for k in range(n):
        item = answer[k * SENTENCE:(k + 1) * SENTENCE]
        if item[:3] != num(n - 1 - k) or item[3] != ":":
            return False
        for cat, w in zip(PATTERN, item[4:]):
            if (w != ".") if cat == "." else (w not in GRAMMAR[cat]):
                return False
    return True


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
    """batch(step) -> (ids, loss region, mask-probability floor), each [B, L], with a fixed token budget per step.

    Each step picks one canvas length (TRAIN_CANVASES: 64 to 1024 positions after the prompt, at least the answer
    + 1) so the model learns to end an answer with EOS whatever the canvas size; only the answer (less any given
    prefix) and its EOS fill are in the loss.
    Rows are prompt_pad + canvas long: the canvas part is longer by however much the prompt is shorter.
    """

    LENGTHS = (256, 512, 1024)  # the canvases requests are evaluated on (bench.quality)
    # Training canvases, drawn per step: 4 steps in 7 are short canvases with short answers. Long rows alone did not
    # teach a local rule in thousands of steps; a 2-layer model learnt "copy the token 5 back" after a visible
    # prefix perfectly in 200 steps of 64-token rows, 0.39 of the time in 400 steps of 512-token rows, and perfectly
    # at 512 when half its steps were 64-token rows (the experiment is in the issue-3 notes).
    TRAIN_CANVASES = (64, 64, 128, 128, 256, 512, 1024)
    NEAR = 64  # a continuation row noises at most this many tokens after its given prefix (twice a block)
    CUT_STEPS = 0.25  # steps whose continuation rows end mid-answer, as a pruned window shows it (canvas <= 512)
    FAR = 64  # a cut row's always-masked tail after its noised tokens: at most this long
    # Rows of the other steps that are cut rows too (canvas <= 512). A canvas holds an answer only up to its size, so
    # without them a 64-position row counted down from 15 at most, and numbers over 127 came almost only from cut
    # steps: the v10 model got a number's tens wrong 4 times in 82 with both neighbours visible (202 -> 212) and the
    # answer's first number 16 times in 82, all tens or hundreds, all at numbers over 100 but one.
    WIDE = 0.4
    FIRST = 0.25  # cut rows that noise the answer from its first token (the first number read off the prompt)

    def __init__(self, tokens_per_step: int, seed: int = 0, prompt_pad: int = 24, split: float = 0.5):
        self.budget, self.seed, self.prompt_pad, self.split = tokens_per_step, seed, prompt_pad, split
        self.ids = {w: i for i, w in enumerate(SPECIALS + WORDS)}

    def encode(self, words: list[str]) -> list[int]:
        return [self.ids[w] for w in words]

    def prompt_ids(self, ex: Example) -> list[int]:
        return [BOS, USER] + self.encode(ex.prompt) + [ASSISTANT]

    def __call__(self, step: int):
        rng = random.Random(self.seed * 104_729 + step)
        canvas = rng.choice(self.TRAIN_CANVASES)
        cut = self.split > 0 and rng.random() < self.CUT_STEPS
        canvas = min(canvas, 512) if cut else canvas  # no answer is longer than 1023 tokens: a cut row needs more
        return self.rows(rng, canvas, max(1, self.budget // (self.prompt_pad + canvas)), cut=cut)

    def rows(self, rng: random.Random, canvas: int, count: int, cut: bool = False):
        """`count` random examples on one canvas -> (ids, loss region, mask-probability floor), each
        [count, prompt_pad + canvas]. cut: every row is a continuation that ends mid-answer (`cut_row`)."""
        import torch

        rows, regions, floors = [], [], []
        for _ in range(count):
            task = rng.choice(sorted(TASKS))
            if cut or (self.split > 0 and canvas <= 512 and rng.random() < self.WIDE):
                row, region, floor = self.cut_row(rng, task, self.prompt_pad + canvas)
                rows.append(row)
                regions.append(region)
                floors.append(floor)
                continue
            ex = TASKS[task](rng, canvas - 1, uniform=True)
            head = self.prompt_ids(ex)
            answer = self.encode(ex.answer)
            near = None
            if rng.random() < self.split:
                # A continuation row, shaped like one step of semi-autoregressive decoding: the answer's first j
                # tokens are given like the prompt, the next `near` tokens are noised at t, and everything right
                # of them is masked (floor 1). Uniform masking of whole answers almost never shows the model a
                # visible left part with everything right of it masked, yet every block decodes from exactly
                # that; models trained without such rows counted from the EOS boundary on the right and never read
                # the numbers left of a position (0 of 30 next numbers right with the right side masked).
                # A quarter start at the answer's first token: the first number is read off the prompt, and a
                # uniform j made that case rare (1 in ~100 rows); it was the 5000-step model's commonest error.
                j = 0 if rng.random() < 0.25 else rng.randint(1, len(answer))
                head, answer = head + answer[:j], answer[j:]
                near = rng.randint(1, self.NEAR)
            # Rows start with the prompt exactly as a request does (no left padding: a model trained behind EOS
            # pads meets prompts without them at inference); a shorter prompt gets a longer EOS fill instead.
            fill = self.prompt_pad + canvas - len(head)
            body = (answer + [EOS] * fill)[:fill]
            rows.append(head + body)
            regions.append([False] * len(head) + [True] * fill)
            near = fill if near is None else min(near, fill)
            floors.append([0.0] * (len(head) + near) + [1.0] * (fill - near))
        return torch.tensor(rows), torch.tensor(regions), torch.tensor(floors)

    def cut_row(self, rng: random.Random, task: str, length: int) -> tuple[list[int], list[bool], list[float]]:
        """A continuation row that stops mid-answer, as a pruned window shows a request: the prompt, a given prefix,
        up to NEAR noised tokens, up to FAR always-masked ones (FIRST: no prefix, all the rest masked), and nothing
        after them (no EOS fill: the answer goes on). So the row's end is not the answer's end, and how long the
        answer is can only come from the prompt."""
        while True:  # an answer longer than the row
            ex = TASKS[task](rng, MAX_ANSWER, uniform=True)
            head, answer = self.prompt_ids(ex), self.encode(ex.answer)
            if len(head) + len(answer) > length:
                break
        room = length - len(head)
        near = rng.randint(1, min(self.NEAR, room))
        # FIRST: no given prefix and the rest of the row masked, as the first block of a long answer sees it; only
        # on short rows, where the masked tail (weight 1 each in the loss) does not swamp the noised tokens.
        first = room <= self.NEAR + 2 * self.FAR and rng.random() < self.FIRST
        far = room - near if first else rng.randint(0, min(self.FAR, room - near))
        j = room - near - far  # the given prefix fills the rest
        return (head + answer[:room], [False] * (len(head) + j) + [True] * (near + far),
                [0.0] * (len(head) + j + near) + [1.0] * far)


def heldout(n: int, seed: int = 99991, max_answer: int = 1023, min_answer: int = 128) -> list[Example]:
    """A fixed, seeded evaluation set, alternating tasks (disjoint in practice from training draws), of long answers
    only (at least `min_answer` tokens: the issue's measure; the draw's shorter 15% are skipped)."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    out: list[Example] = []
    while len(out) < n:
        ex = TASKS[names[len(out) % len(names)]](rng, max_answer)
        if len(ex.answer) >= min_answer:
            out.append(ex)
    return out
