"""Padded vs packed batch layouts of the engine's batched forward, measured side by side.

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

from diffuserve.engine.config import build_config
from diffuserve.engine.decoding import DecodeOptions, get_method
from diffuserve.engine.engine import Engine
from diffuserve.engine.llm import LLM
from diffuserve.engine.model.kv_pool import KVPool
from diffuserve.engine.request import Request
from diffuserve.engine.runner import ModelRunner
from diffuserve.engine.scheduler import Limits, Scheduler

PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "KING LEAR.\n", "HAMLET.\nTo be, or not to be"]


LAYOUTS = {"padded": dict(pack=False),  # every request padded to the longest plan
           "packed-1": dict(pack=True, group_cost=10**9),  # real rows back to back, one attention call for all
           "packed": dict(pack=True)}  # the engine's: attention in groups of similar row counts


def one_round(llm: LLM, layout: str, n: int, opts: DecodeOptions, stagger: int) -> tuple[float, float]:
    pool = KVPool.for_model(llm.model, 256 << 20)
    engine = Engine(llm.model, Scheduler(Limits(), pool), ModelRunner(llm.model, pool, **LAYOUTS[layout]))
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
    cfg = build_config(model__path=args.model)  # what `diffuserve serve MODEL` runs: its options and dtype
    llm = LLM(args.model, cfg.model.dtype)
    name = cfg.decoding.default_method(llm.spec.family)
    opts = cfg.decoding.options_for(get_method(name), name).with_(gen_length=args.gen, steps=args.gen)
    print(f"{args.model} {llm.model.dtype}, {opts}", file=sys.stderr)
    one_round(llm, "packed", 2, opts, 0)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    rows = 0.0
    for r in range(args.rounds):
        for name in list(LAYOUTS)[:: 1 if r % 2 == 0 else -1]:
            ms, rows = one_round(llm, name, args.requests, opts, args.stagger)
            times[name].append(ms)
            print(f"round {r + 1} {name}: {ms:.1f} ms/step", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.requests} requests, gen {args.gen}, stagger {args.stagger}, real rows/step {rows:.0f}: "
          + ", ".join(f"{k} {v:.1f} ms/step" for k, v in med.items()) + f" (medians of {args.rounds}); "
          f"packed is {med['padded'] / med['packed']:.2f}x faster than padded, "
          f"{med['packed-1'] / med['packed']:.2f}x than packed-1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
