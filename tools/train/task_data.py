"""tiny-task's synthetic tasks: long answers with exact checkers.

Every task is a chat turn (user: an instruction ending in a number; assistant: the answer, then EOS to the end of
the canvas). Tokens are words of a fixed vocabulary. A number k (0..419) is four residue tokens, k mod 7, 5, 4 and
3: 47 is "w5 x2 y3 z2" (the Chinese remainder theorem makes the four a unique name for every k below 420). Both tasks
count DOWN from the prompt's number to "w0 x0 y0 z0". In `count` the chat template puts exactly one token
(<|assistant|>) between that number and the answer, where a comma sits between two numbers: the answer's first
number follows from the prompt by the very rule that links every later number to the one before it. In both the
end is local: EOS comes right after the number zero (the only k with every residue 0), or after its "." in
`sentences`.

Why residues: counting down decrements each residue on its own, modulo its base (w5 -> w4, x0 -> x4), so every
token of the next number is its own kind's nearest token to the left, less one, and no token ever depends on another
place. Decimal numbers need a borrow: the tens go down only when the units were 0. That borrow was the last error
every decimal model kept (v9 to v11 below). Why small moduli: low-confidence decoding commits the tokens it is surest
of first, wherever they are, and a residue i numbers to the right of a known one is (r - i) mod m, which a small
model computes at a distance for m <= 7 (every mod-3 and mod-7 token of the v12 model, moduli 10, 7, 3, was right and
committed first) but not for m = 10: v12 guessed far units digits at confidence 0.8 before the answer's first one
and got the first number wrong in 24 of 36 block-0 probes, every later number one less than its wrong neighbour.

Earlier designs and what they taught us (details in the issue notes): with variable-width numbers the first model
misaligned carries; with one token per number a second sat near chance on counting; with "count from A to B" a third
never learned to read A or B from the prompt. Probing the fourth, trained on whole answers only: with the numbers
left of a position visible and everything right of it masked, it predicted the next number 0 of 30 times; it filled
gaps between visible numbers and counted from the EOS boundary on the right, which uniform masking nearly always
leaves partly visible and semi-autoregressive decoding never does. So half the rows are continuations
(`TaskBatches.split`): a random prefix of the answer is given with the prompt, the next few tokens are noised and
everything after them is masked, as a semi-autoregressive block sees it. Plain digits "0 4 7" made each digit of the
next number the digit exactly four positions back among other digits, a sharp positional pattern a small model had
not formed after 2,500 steps; place tokens ("h0 t4 u7") made it a lookup by content, and residue tokens keep that.

The decimal place-token models (v9 to v11, 4000 to 6000 steps) all fell short of bench.quality's 95% on the
borrow. v9's answers began with A-1: each failure decoded again went wrong at the first number (168 -> "157 , 156",
a subtraction with a borrow seen once per row), so answers begin with the prompt's own number. v10 still failed at
the first number, and with only one number masked and the whole right answer around it got the tens or hundreds
wrong 4 times in 82 in mid-answer and 16 in 82 at the first number, nearly all over 100 (short canvases only ever
counted from small numbers: hence `TaskBatches.WIDE` and `FIRST`). v11 got every probe right with the answer
around it but decoded block 0 of 8 in 45 count prompts wrong, all at a borrow ("101 , 100 , 109").

- `count` (deterministic): "count down from A" -> "A , A-1 , ... , 0". One right answer.
- `sentences` (many answers): "write sentences down from N" -> N+1 sentences "DET ADJ NOUN VERB ADV : k ."
  numbered N down to 0, with any words of each category; valid when every sentence parses and the numbering is
  right.
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
MODULI = (7, 5, 4, 3)  # pairwise coprime: the residues name every number below their product
RESIDUES = "wxyz"  # the token prefix of each residue
DIGITS = len(MODULI)  # tokens per number
MAX_NUMBER = 419  # 7 * 5 * 4 * 3 - 1
MAX_ANSWER = 1023  # tokens: the longest answer any task writes (1024-position canvases)
WORDS = ([f"{r}{d}" for r, m in zip(RESIDUES, MODULI) for d in range(m)]
         + [",", ".", ":", "count", "down", "from", "write", "sentences"]
         + sorted({w for ws in GRAMMAR.values() for w in ws}))
# No end-of-turn token: <|assistant|> alone separates the prompt's last number from the answer (see above).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def num(n: int) -> list[str]:
    """A number as its residue tokens: 47 -> ["w5", "x2", "y3", "z2"]."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"{n} is outside 0..{MAX_NUMBER}")
    return [f"{r}{n % m}" for r, m in zip(RESIDUES, MODULI)]


_VALUES = {tuple(num(n)): n for n in range(MAX_NUMBER + 1)}


def value(tokens: list[str]) -> int:
    """The inverse of num(); a malformed number is -1 (never a valid count)."""
    return _VALUES.get(tuple(tokens), -1)


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


NUMBER = DIGITS + 1  # tokens per counted number: its residues and a comma
# A sentence is the pattern's words, ":", its number and "." (PATTERN's last word): the number comes last, so the
# answer's end (EOS) is one token after the number zero, as in `count`. With the number first (v13, "k : DET ...
# ."), every invalid answer of 6 in 20 was one stray residue token after the last sentence: the end was 7 tokens
# past the zero, and low-confidence decoding committed the next number's first residue there before it.
SENTENCE = len(PATTERN) + 1 + DIGITS


def count_answer(start: int) -> list[str]:
    """The one right answer of "count down from start": start , start-1 , ... , 0."""
    answer = []
    for v in range(start, -1, -1):
        answer += num(v) + ([","] if v else [])
    return answer


def make_count(rng: random.Random, max_answer: int, uniform: bool = False) -> Example:
    # n numbers, 5n - 1 tokens: 159..1019
    n = _length(rng, 32, min(MAX_NUMBER + 1, (max_answer + 1) // NUMBER), short=5, uniform=uniform)
    return Example("count", ["count", "down", "from", *num(n - 1)], count_answer(n - 1))


def make_sentences(rng: random.Random, max_answer: int, uniform: bool = False) -> Example:
    n = _length(rng, 12, max_answer // SENTENCE, short=3, uniform=uniform)  # 11n tokens: 132..1023
    answer = []
    for k in range(n - 1, -1, -1):
        answer += [rng.choice(GRAMMAR[w]) for w in PATTERN[:-1]] + [":"] + num(k) + ["."]
    return Example("sentences", ["write", "sentences", "down", "from", *num(n - 1)], answer)


TASKS = {"count": make_count, "sentences": make_sentences}


def check_count(prompt: list[str], answer: list[str]) -> bool:
    """Exact match with the one right answer."""
    start = value(prompt[3:3 + DIGITS])
    return start >= 0 and answer == count_answer(start)


def check_sentences(prompt: list[str], answer: list[str]) -> bool:
    """Valid when the answer is exactly N+1 sentences DET ADJ NOUN VERB ADV : k . numbered k = N down to 0."""
    n = value(prompt[4:4 + DIGITS]) + 1  # sentences
    if n < 1 or len(answer) != n * SENTENCE:
        return False
    for k in range(n):
        item = answer[k * SENTENCE:(k + 1) * SENTENCE]
        words, colon, number, stop = item[:len(PATTERN) - 1], item[len(PATTERN) - 1], item[len(PATTERN):-1], item[-1]
        if colon != ":" or number != num(n - 1 - k) or stop != ".":
            return False
        if any(w not in GRAMMAR[cat] for cat, w in zip(PATTERN, words)):
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
