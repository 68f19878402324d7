"""The held-out task evaluation of a tiny-task-style checkpoint: seeded prompts, decoded answers, exact checkers.

`bench.quality` reports it; `diffuserve prune` scores a pruned checkpoint with it.
"""

from __future__ import annotations

import sys

from diffuserve.engine.decoding import DecodeOptions
from diffuserve.engine.llm import LLM


def task_prompts(llm: LLM, n: int, seed: int | None = None):
    """The first n held-out examples (of the set drawn with `seed`, default the evaluation set) with their prompts."""
    from diffuserve.tools.train import task_data as tk

    for ex in tk.heldout(n) if seed is None else tk.heldout(n, seed=seed):
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": " ".join(ex.prompt)}],
                                                 add_generation_prompt=True, tokenize=False)
        yield ex, llm.tokenizer(text, add_special_tokens=False)["input_ids"]


def canvas_for(answer_tokens: int) -> int:
    """The canvas an example is decoded on when --gen-length is not given: the smallest of the training canvases
    (256, 512, 1024) that holds the answer and one EOS, so every answer length is tested on the canvas size the
    model was trained to fill with answer-then-EOS. The answer's exact length is never revealed."""
    from diffuserve.tools.train.task_data import TaskBatches

    return next(c for c in TaskBatches.LENGTHS if c > answer_tokens)


def eval_task(llm: LLM, method: str, opts: DecodeOptions | dict, n: int, seed: int, fixed_canvas: bool = False) -> dict:
    """opts: the method's options, or a name -> value mapping of them."""
    from diffuserve.tools.train import task_data as tk

    opts = llm.method(method).make_options(opts)

    per_task: dict[str, dict] = {}
    totals = {"generated_tokens": 0, "forward_passes": 0, "wall_time_s": 0.0}
    for i, (ex, ids) in enumerate(task_prompts(llm, n)):
        run_opts = opts if fixed_canvas else opts.with_(gen_length=canvas_for(len(ex.answer)))
        out = llm.generate(ids, method, run_opts, seed=seed + i)
        words = out.completion.text.split()
        ok = tk.CHECKERS[ex.task](ex.prompt, words)
        row = per_task.setdefault(ex.task, {"n": 0, "correct": 0, "answer_tokens": 0, "min_answer_tokens": 10**9,
                                            "max_answer_tokens": 0})
        row["n"] += 1
        row["correct"] += int(ok)
        row["answer_tokens"] += len(ex.answer)
        row["min_answer_tokens"] = min(row["min_answer_tokens"], len(ex.answer))
        row["max_answer_tokens"] = max(row["max_answer_tokens"], len(ex.answer))
        totals["generated_tokens"] += len(out.completion.token_ids)
        totals["forward_passes"] += out.forward_calls
        totals["wall_time_s"] += out.wall_time_s
        print(f"[{i + 1}/{n}] {ex.task} len {len(ex.answer)} canvas {run_opts.gen_length} {'ok' if ok else 'WRONG'} "
              f"({out.forward_calls} passes, {out.wall_time_s:.1f}s)", file=sys.stderr, flush=True)
    for name, row in per_task.items():
        key = "exact_match" if name in tk.DETERMINISTIC else "validity"
        row[key] = round(row.pop("correct") / row["n"], 4)
        row["mean_answer_tokens"] = round(row.pop("answer_tokens") / row["n"], 1)
    return {"tasks": per_task, **totals}
