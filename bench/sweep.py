"""Choose the `window` serving mode's defaults by measurement: a grid of window sizes, side by side in one run.

    python -m bench.sweep [--model tiny-text] [--gen 64] [--windows 32,64] [--actives 4,8] [--refreshes 8,16,32]
                          [--batch 16] [--rounds 2] [--n 8] [--json FILE]

For every (W, A, R) it reports, through the serving engine as the server runs it: output tokens/s with one
request at a time and with `--batch` concurrent requests (the best of `--rounds` rounds, the settings interleaved
round by round so that the machine's drift hits them all alike), their ratio, and query rows computed per
generated token; and, from bench.quality on the same model, agreement with vanilla decoding and the ELBO of the
continuations (tiny-text) or exact match / validity (tiny-task). Rows are sorted by concurrent tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from bench.decode import Row, load, prompts_for, run_engine
from diffuserve.engine.decoding.window import WindowOptions


def settings(windows, actives, refreshes, gen: int) -> list[WindowOptions]:
    return [WindowOptions(gen_length=gen, steps=gen, window_tokens=w, active_tokens=a, refresh_cycle=r,
                          eos_early_exit=True)
            for w, a, r in itertools.product(windows, actives, refreshes) if a <= w]


def speed(llm, name: str, opts: WindowOptions, batch: int) -> tuple[Row, Row]:
    """One round: every prompt alone, then `batch` requests at once (the prompt list repeated to fill it)."""
    if name == "tiny-text":  # eight different openings (bench.decode repeats one, for equal-length batches)
        from bench.quality import TEXT_PROMPTS

        prompts = [(llm.encode(t), None) for t in TEXT_PROMPTS]
    else:
        prompts = prompts_for(llm, name, 8, 1)
    one, many = Row(name, opts.gen_length, 1, "window"), Row(name, opts.gen_length, batch, "window")
    for p in prompts:
        run_engine(llm, "window", opts, [p], one)
    run_engine(llm, "window", opts, [prompts[i % len(prompts)] for i in range(batch)], many)
    return one, many


def quality(llm, opts: WindowOptions, n: int) -> dict:
    from bench.quality import eval_task, eval_text, is_task_model

    if is_task_model(llm):
        scores = eval_task(llm, "window", opts, n, 0)
        return {task: row.get("exact_match", row.get("validity")) for task, row in scores["tasks"].items()}
    scores = eval_text(llm, "window", opts, n, 0)
    return {"agreement": scores["agreement_with_vanilla"], "elbo": scores["elbo_nats_per_token"]}


def sweep(name: str, grid: list[WindowOptions], batch: int, rounds: int, n: int, out=sys.stderr) -> list[dict]:
    llm = load(name)
    speed(llm, name, grid[0], batch)  # warm-up: first-call allocations and thread pools
    best: dict[int, tuple[float, float, Row, Row]] = {}
    for r in range(rounds):
        for i, opts in enumerate(grid):
            one, many = speed(llm, name, opts, batch)
            old = best.get(i)
            best[i] = (max(one.tok_s, old[0] if old else 0), max(many.tok_s, old[1] if old else 0), one, many)
            print(f"round {r + 1}/{rounds} W={opts.window_tokens} A={opts.active_tokens} R={opts.refresh_cycle}: "
                  f"c1 {one.tok_s:.1f} c{batch} {many.tok_s:.1f} tok/s", file=out, flush=True)
    results = []
    for i, opts in enumerate(grid):
        c1, cb, one, many = best[i]
        results.append({"W": opts.window_tokens, "A": opts.active_tokens, "R": opts.refresh_cycle,
                        "c1_tok_s": round(c1, 1), f"c{batch}_tok_s": round(cb, 1), "ratio": round(cb / c1, 2),
                        "rows_per_token": round(many.query_rows / max(1, many.tokens), 1),
                        **quality(llm, opts, n)})
    return sorted(results, key=lambda d: -d[f"c{batch}_tok_s"])


def table(results: list[dict]) -> str:
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(d[k]) for k in keys) + " |" for d in results]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-text")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--windows", default="32,64")
    ap.add_argument("--actives", default="4,8")
    ap.add_argument("--refreshes", default="8,16,32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=8, help="bench.quality examples per setting")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    grid = settings(ints(args.windows), ints(args.actives), ints(args.refreshes), args.gen)
    results = sweep(args.model, grid, args.batch, args.rounds, args.n)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
