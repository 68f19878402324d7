"""Probes of a tiny-task checkpoint's counting, each a few single forwards (seconds), for use while it trains.

    python -m bench.task_probe --model DIR_OR_NAME [--n 30]

- `left`: the prompt and the first k numbers of a `count` answer visible, everything after them masked; is the
  argmax of the next number's positions the next number? This is what every semi-autoregressive block decodes from.
- `first`: the same with k = 0: the first number read off the prompt.
- `block0`: a count answer's first 32 positions decoded as bench.quality's vanilla decoder does (its own order).
- `canvas`: one forward on "count down from N" and C masks for several C; the first number should follow the
  prompt, not C. A model trained where the mask count gave the answer's length away read its tens and hundreds
  off C, and a pruned window, which shows few masks, then got very short answers.
Numbers from these probes are in the issue-3 notes; bench.quality is the real evaluation.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from diffuserve.engine.model import ForwardBatch
from diffuserve.tools.train import task_data as tk

CANVASES = (32, 64, 128, 256, 512, 1024)


def _argmax_after(model, ids: list[int], start: int, width: int = tk.DIGITS) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model.forward(ForwardBatch(ids=x, positions=torch.arange(x.shape[1])[None]))[0]  # [L, V]
    return logits[start:start + width].argmax(-1).tolist()


def next_number(model, n: int, first: bool, seed: int = 7, canvas: int = 256) -> int:
    """How many of n count examples get the next number right with everything right of it masked."""
    rng, batches, right = random.Random(seed), tk.TaskBatches(0, split=0.0), 0
    for _ in range(n):
        ex = tk.make_count(rng, canvas - 1)
        answer = batches.encode(ex.answer)
        k = 0 if first else rng.randint(0, max(0, (len(answer) + 1) // tk.NUMBER - 2))
        head = batches.prompt_ids(ex) + answer[:tk.NUMBER * k]
        ids = head + [tk.MASK] * (canvas - tk.NUMBER * k)
        right += _argmax_after(model, ids, len(head)) == answer[tk.NUMBER * k:tk.NUMBER * k + tk.DIGITS]
    return right


def block0(model, starts=range(31, 204, 5), block: int = 32, canvas: int = 256) -> dict:
    """Vanilla decoding of a count answer's first block (one token per step, the most confident masked position
    first, the rest of the canvas masked): how many starts get the block exactly right, and the first few wrong.
    Unlike `left`, the model picks its own order, as bench.quality's decoder does: v12 got 12 of 36 (it committed
    a far units token, wrong, before the answer's first one), v13 34 of 35."""
    batches, words, right, wrong = tk.TaskBatches(0, split=0.0), tk.SPECIALS + tk.WORDS, 0, []
    for start in starts:
        head = batches.prompt_ids(tk.Example("count", ["count", "down", "from", *tk.num(start)], []))
        ids, p = torch.tensor([head + [tk.MASK] * canvas]), len(head)  # [1, L]
        with torch.inference_mode():
            for _ in range(block):
                logits = model.forward(ForwardBatch(ids=ids, positions=torch.arange(ids.shape[1])[None]))[0]
                conf, tok = logits[p:p + block].float().softmax(-1).max(-1)  # [block] each
                conf = conf.masked_fill(ids[0, p:p + block] != tk.MASK, -1.0)  # decoded positions stay
                i = int(conf.argmax())
                ids[0, p + i] = tok[i]
        got = ids[0, p:p + block].tolist()
        if got == batches.encode(tk.count_answer(start))[:block]:
            right += 1
        elif len(wrong) < 5:
            wrong.append(f"{start}: " + " ".join(words[t] for t in got))
    return {"right": f"{right}/{len(starts)}", "wrong": wrong}


def canvas_cue(model, starts=(45, 81, 133, 206)) -> dict[int, dict[int, int]]:
    """start -> {C: the first number predicted with C masks after the prompt} (-1: not a number)."""
    batches, out, words = tk.TaskBatches(0, split=0.0), {}, tk.SPECIALS + tk.WORDS
    for start in starts:
        head = batches.prompt_ids(tk.Example("count", ["count", "down", "from", *tk.num(start)], []))
        out[start] = {c: tk.value([words[t] for t in _argmax_after(model, head + [tk.MASK] * c, len(head))])
                      for c in CANVASES}
    return out


def main(argv=None) -> int:
    from diffuserve.engine.llm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a tiny-task checkpoint directory or bundled name")
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args(argv)
    model = LLM(args.model).model
    report = {"left": f"{next_number(model, args.n, first=False)}/{args.n}",
              "first": f"{next_number(model, args.n, first=True)}/{args.n}", "canvas": canvas_cue(model),
              "block0": block0(model)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
