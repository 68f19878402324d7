"""Padded vs packed batch layout of the engine's batched forward, measured side by side.

    python -m bench.layout [--requests 16] [--gen 64] [--rounds 5]

N requests are admitted a few steps apart (so their window phases differ, as under real load: one request's
refresh step computes its whole window while the others compute a few active rows) and decoded to the end with
each layout in turn, alternating rounds so machine noise hits both alike. Prints ms per engine step, real and
computed rows per step, and the ratio. Both layouts give identical tokens (tests/test_engine.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from engine.decoding import DecodeOptions, get_method
from engine.engine import Engine
from engine.llm import LLM
from engine.model.kv_pool import KVPool
from engine.request import Request
from engine.runner import ModelRunner
from engine.scheduler import Limits, Scheduler

PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "KING LEAR.\n", "HAMLET.\nTo be, or not to be"]


def one_round(llm: LLM, pack: bool, n: int, opts: DecodeOptions, stagger: int) -> tuple[float, float]:
    pool = KVPool.for_model(llm.model, 256 << 20)
    engine = Engine(llm.model, Scheduler(Limits(), pool), ModelRunner(llm.model, pool, pack=pack))
    rows = []
    step = engine.runner.step

    def counted(work):
        out, stats = step(work)
        rows.append(stats.rows)
        return out, stats

    engine.runner.step = counted
    t0, steps = time.perf_counter(), 0
    for i in range(n):
        engine.submit(Request(f"r{i}", llm.encode(PROMPTS[i % len(PROMPTS)]), get_method("window"), opts, i,
                              lambda out: None, llm.tokenizer, llm.spec.stop_ids, llm.spec.mask_id))
        for _ in range(stagger):
            engine.step()
            steps += 1
    while not engine.scheduler.idle:
        engine.step()
        steps += 1
    return 1000 * (time.perf_counter() - t0) / steps, sum(rows) / len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layout", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-text")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--stagger", type=int, default=3, help="engine steps between admissions")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    llm = LLM(args.model)
    opts = DecodeOptions(gen_length=args.gen)
    one_round(llm, True, 2, opts, 0)  # warm-up
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    rows = 0.0
    for r in range(args.rounds):
        for name in ("padded", "packed") if r % 2 == 0 else ("packed", "padded"):
            ms, rows = one_round(llm, name == "packed", args.requests, opts, args.stagger)
            times[name].append(ms)
            print(f"round {r + 1} {name}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.requests} requests, gen {args.gen}, stagger {args.stagger}, real rows/step {rows:.0f}: "
          f"padded {med['padded']:.1f} ms/step, packed {med['packed']:.1f} ms/step (medians of {args.rounds}); "
          f"packed is {med['padded'] / med['packed']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
