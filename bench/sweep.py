"""Choose the `window` serving mode's defaults by measurement: a grid of its options, side by side in one run.

    python -m bench.sweep [--model tiny-task|tiny-text] [--gen 1024] [--grid "threshold=0.9,0.95;active_tokens=8,16"]
                          [--window K=V,...] [--batch 8] [--rounds 1] [--n 16] [--json FILE]

Every combination of the `--grid` values (any WindowOptions fields, on top of bench.decode's defaults for the mode
and `--window`) is measured through the serving engine as the server runs it: output tokens/s with one request at
a time and with `--batch` concurrent requests (the best of `--rounds` rounds, the settings interleaved round by
round so that the machine's drift hits them all alike), their ratio, forward passes and query rows computed per
generated token; and next to speed, quality:
 - tiny-task: answers right (count exact match, sentences validity) on the *tune* prompt set (bench.decode
   `--prompts tune`), never on the set the tables report;
 - tiny-text: agreement with vanilla decoding and the ELBO of the continuations (bench.quality).
Rows are sorted by answers right, then by tokens/s with one request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from bench.decode import Row, load, options_for, parse_options, prompts_for, run_engine, tally
from diffuserve.engine.decoding.window import WindowOptions

# the flags of the first version of this tool, kept as shorthands for grid entries
SHORTHANDS = {"windows": "window_tokens", "actives": "active_tokens", "refreshes": "refresh_cycle"}


def parse_grid(text: str) -> dict[str, list]:
    """'threshold=0.9,0.95;active_tokens=8,16' -> {"threshold": [0.9, 0.95], "active_tokens": [8, 16]}."""
    grid = {}
    for item in filter(None, text.split(";")):
        key, _, values = item.partition("=")
        grid[key] = [parse_options(f"{key}={v}")[key] for v in values.split(",")]
    return grid


def settings(grid: dict[str, list], gen: int, model: str = "tiny-task", base: dict | None = None
             ) -> list[WindowOptions]:
    """Every combination of the grid's values over the mode's bench.decode options (A <= W where both vary)."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        opts = options_for(model, "window", gen, {**(base or {}), **dict(zip(keys, values))})
        if opts.active_tokens <= opts.window_tokens:
            out.append(opts)
    return out


def prompts(llm, name: str, n: int, gen: int) -> list[tuple[list[int], object]]:
    if name == "tiny-text":  # eight different openings (bench.decode repeats one, for equal-length batches)
        from bench.quality import TEXT_PROMPTS

        return [(llm.encode(t), None) for t in TEXT_PROMPTS][:n]
    return prompts_for(llm, name, n, 1, gen, "tune")


def speed(llm, opts: WindowOptions, group, batch: int) -> tuple[Row, Row]:
    """One round: every prompt alone (answers tallied), then `batch` requests at once (the prompts repeated)."""
    one, many = Row("", opts.gen_length, 1, "window"), Row("", opts.gen_length, batch, "window")
    for p in group:
        run_engine(llm, "window", opts, [p], one)
    run_engine(llm, "window", opts, [group[i % len(group)] for i in range(batch)], many)
    return one, many


def text_quality(llm, opts: WindowOptions, n: int) -> dict:
    from bench.quality import eval_text

    scores = eval_text(llm, "window", opts, n, 0)
    return {"agreement": scores["agreement_with_vanilla"], "elbo": scores["elbo_nats_per_token"]}


def sweep(name: str, grid: list[WindowOptions], keys: list[str], batch: int, rounds: int, n: int,
          out=sys.stderr) -> list[dict]:
    llm = load(name)
    group = prompts(llm, name, n, grid[0].gen_length)
    speed(llm, grid[0], group[:1], 1)  # warm-up: first-call allocations and thread pools
    best: dict[int, tuple[float, float, Row, Row]] = {}
    for r in range(rounds):
        for i, opts in enumerate(grid):
            one, many = speed(llm, opts, group, batch)
            old = best.get(i)
            best[i] = (max(one.tok_s, old[0] if old else 0), max(many.tok_s, old[1] if old else 0), one, many)
            label = " ".join(f"{k}={getattr(opts, k)}" for k in keys)
            right = f", right {one.correct}/{one.checked}" if one.checked else ""
            print(f"round {r + 1}/{rounds} {label}: c1 {one.tok_s:.1f} c{batch} {many.tok_s:.1f} tok/s, "
                  f"{one.forward_passes} forwards{right}", file=out, flush=True)
    results = []  # (sort key: answers right, then c1 tok/s; row)
    for i, opts in enumerate(grid):
        c1, cb, one, many = best[i]
        d = {k: getattr(opts, k) for k in keys}
        d.update({"c1_tok_s": round(c1, 1), f"c{batch}_tok_s": round(cb, 1), "ratio": round(cb / c1, 2),
                  "forwards": one.forward_passes, "rows_per_token": round(one.query_rows / max(1, one.tokens), 1)})
        if one.checked:
            d["right"] = f"{one.correct}/{one.checked}"
            d.update({t: f"{c}/{k}" for t, (c, k) in sorted(one.per_task.items())})
        else:
            d.update(text_quality(llm, opts, n))
        results.append(((-one.correct, -d["c1_tok_s"]), d))
    return [d for _, d in sorted(results, key=lambda kd: kd[0])]


def table(results: list[dict]) -> str:
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(d[k]) for k in keys) + " |" for d in results]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-task")
    ap.add_argument("--gen", type=int, default=1024)
    ap.add_argument("--grid", default="", help="'key=v1,v2;key2=...' over WindowOptions fields")
    ap.add_argument("--window", default="", metavar="K=V,...", help="fixed options under every grid point")
    for flag, key in SHORTHANDS.items():
        ap.add_argument(f"--{flag}", help=f"shorthand for --grid {key}=...")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n", type=int, default=16, help="prompts per setting (tiny-task: from the tune set)")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    grid = parse_grid(args.grid)
    for flag, key in SHORTHANDS.items():
        if getattr(args, flag):
            grid[key] = parse_grid(f"{key}={getattr(args, flag)}")[key]
    if not grid:
        ap.error("nothing to sweep: give --grid (or --windows/--actives/--refreshes)")
    points = settings(grid, args.gen, args.model, parse_options(args.window))
    results = sweep(args.model, points, list(grid), args.batch, args.rounds, args.n)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
