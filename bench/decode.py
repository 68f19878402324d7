"""Every LLaDA-family decoding method side by side, on the same model and prompts, in one run.

    python -m bench.decode [--models tiny-task,tiny-text,random-100m] [--lengths 256,512,1024,2048] [--batch 1,8]
                           [--methods vanilla,fast_dllm_prefix,...] [--n 8] [--prompts report|tune]
                           [--vanilla-forwards K] [--dtype float32|bfloat16] [--json FILE] [--md FILE] [--plot DIR]

For each model, generation length and batch size, each method decodes the same prompts and the table reports
generated tokens/s (non-EOS tokens after stop truncation, as the papers count), the speed-up over vanilla (the
reference sampler, one token per step), forward passes, query rows computed per generated token, and, on tiny-task,
exact match / validity from the task checkers. Batch B: every method runs B concurrent requests through the serving
engine (scheduler, runner, KV pool), sharing its steps, as the server runs them; batch 1 runs each request alone
through the same engine step (`window` through the engine as served, the others through `engine.offline`).

A length the model's positions cannot hold beside the prompt is decoded on the longest canvas they allow (tiny-task,
2048 positions: 2048 asked -> 2048 - prompt, rounded down to whole blocks of 32, generated), and the table says so
("2048 -> 2016"). On tiny-task the
prompts come from one of two disjoint held-out sets: `report` (what tables show) or `tune` (what defaults are chosen
on, bench.sweep). `--vanilla-forwards K` times vanilla for about K forwards per prompt (whole blocks, more tokens per
step) and scales its time, forwards and rows to the full step count, which is exact for those because every
vanilla forward computes the whole canvas; its tokens and answers are those of the shorter run, and the table marks
the row as scaled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from diffuserve.engine import offline
from diffuserve.engine.decoding import METHODS, DecodeOptions
from diffuserve.engine.detokenizer import finish

BLOCK = 32  # the block length of the block methods below: every generation length is a multiple of it
# method -> options beyond gen_length (steps = gen_length: one token per step unless a threshold decides)
METHOD_OPTIONS = {
    "vanilla": dict(block_length=BLOCK),
    "fast_dllm_prefix": dict(block_length=BLOCK, threshold=0.9),
    "fast_dllm_dual": dict(block_length=BLOCK, threshold=0.9),
    "window_llada": dict(),
    "streaming_llada": dict(block_length=BLOCK, threshold=0.9),
    # our mode, chosen on tiny-task's tune prompts at 1024 (docs/benchmarks.md): 32 active masks, threshold 0.9, a
    # step with no sure candidate commits the best of the first 4 masks (after 3 such steps even when others commit),
    # active masks within 48 positions of the first, commits recomputed once, refreshes of the masks only, every 4
    # steps; each run of adjacent masks commits its best candidate once it predicted the same token 3 times in a row
    "window": dict(threshold=0.9, active_tokens=32, span=48, force="frontier", stall_steps=3, fresh="once",
                   refresh="buffer", refresh_cycle=4, stable=3),
    "freecache": dict(block_length=BLOCK, threshold=0.9),
    "guided": dict(),
    # the Dream family's: its vanilla (`dream`, Dream's own sampler: one block, entropy order) and the block methods,
    # which commit by threshold with alg "confidence_threshold"; `window` serves both families with the options above
    "fast_dllm_dream_dual": dict(block_length=BLOCK, threshold=0.9, alg="confidence_threshold"),
    "streaming_dream": dict(block_length=BLOCK, threshold=0.9, alg="confidence_threshold"),
}
VANILLA = {"llada": ("llada", METHOD_OPTIONS["vanilla"]), "dream": ("dream", {})}  # family -> its vanilla method
# guided needs a causal verifier sharing the model's tokenizer; a model without one skips the method
VERIFIERS = {"tiny-text": "tiny-text-ar", "tiny-task": "tiny-task-ar"}
TASK_MODELS = ("tiny-task", "tiny-task-dream")  # trained on tools.train.task_data: answers are checked
# tiny-task's held-out prompt sets (tools.train.task_data.heldout seeds): tables report on one, defaults are tuned
# on the other. The tune set leaves out every prompt of the report set's first REPORT_MAX examples (count prompts
# repeat across draws: there are only ~170 of them).
PROMPT_SEEDS = {"report": 99991, "tune": 12345}
REPORT_MAX = 128
RANDOM_100M = dict(family="llada", vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                   intermediate_size=2048, rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False, max_positions=4096,
                   mask_id=8191, eos_id=8190, pad_id=8190, bos_id=8189, eot_id=8188)


@dataclass
class Row:
    model: str
    gen_length: int  # positions generated (the longest canvas the model allows, when less than asked)
    batch: int
    method: str
    tokens: int = 0
    wall_s: float = 0.0
    forward_passes: int = 0
    query_rows: int = 0
    correct: int = 0
    checked: int = 0
    extrapolated_from: int = 0  # vanilla only: the steps actually run when --vanilla-forwards cut them short
    asked_length: int = 0  # the --lengths value, when the model's positions did not allow it
    per_task: dict = field(default_factory=dict)  # tiny-task: task -> [correct, checked]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self, vanilla: "Row | None") -> dict:
        d = asdict(self)
        d.update(tok_s=round(self.tok_s, 2), rows_per_token=round(self.query_rows / max(1, self.tokens), 2),
                 speedup=round(self.tok_s / vanilla.tok_s, 2) if vanilla and vanilla.tok_s else None,
                 quality=round(self.correct / self.checked, 4) if self.checked else None)
        return d


class RowCounter:
    """Counts the query rows every model forward computes (real rows only: not a padded batch's padding rows, nor
    the engine's pad rows that round its row count up)."""

    def __init__(self, model):
        self.model, self.rows, self.calls, self._forward = model, 0, 0, model.forward

    def __enter__(self):
        def counted(fb):
            self.calls += 1
            if fb.ragged is not None:
                self.rows += fb.ids.numel() - fb.ragged.pad
            else:
                self.rows += int(fb.valid.sum()) if fb.valid is not None else fb.ids.numel()
            return self._forward(fb)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward  # the instance attribute goes; the class's method shows through again


def load(name: str, dtype: str = "float32"):
    from diffuserve.engine.llm import LLM
    from diffuserve.engine.model import ModelSpec
    from diffuserve.engine.model.saver import random_model

    if name == "random-100m":
        llm = LLM.__new__(LLM)
        llm.model = random_model(ModelSpec(**RANDOM_100M), seed=0, dtype=getattr(torch, dtype)).eval()
        llm.spec, llm.tokenizer, llm.model_dir = llm.model.spec, None, name
        return llm
    return LLM(name, dtype)


def prompts_for(llm, name: str, n: int, batch: int, gen: int = 1024,
                prompts: str = "report") -> list[tuple[list[int], object]]:
    """n prompts (with their task example on tiny-task), in groups of `batch` with equal token lengths. On tiny-task
    the tasks take turns group by group (batch 1: count, sentences, count, ...), and only examples whose answer and
    one EOS fit `gen` positions are used: a longer one cannot be right on that canvas. `prompts`: which held-out
    set (PROMPT_SEEDS)."""
    if name in TASK_MODELS:
        from diffuserve.tools.evaluate import task_prompts
        from diffuserve.tools.train.task_data import heldout

        # task -> prompt length -> prompts: a batch of the reference loops needs equal prompt lengths, and a task's
        # prompts share one length ("count down from" and four residue tokens)
        by_task = defaultdict(lambda: defaultdict(list))
        report = set() if prompts == "report" else {
            tuple(ex.prompt) for ex in heldout(REPORT_MAX, seed=PROMPT_SEEDS["report"])}
        for ex, ids in task_prompts(llm, 40 * max(n, batch), PROMPT_SEEDS[prompts]):
            if tuple(ex.prompt) in report:
                continue
            if len(ex.answer) < gen:
                by_task[ex.task][len(ids)].append((ids, ex))
        queues = {}
        for task, by_len in by_task.items():  # whole groups of `batch`, the commonest lengths first
            queues[task] = [g[i:i + batch] for g in sorted(by_len.values(), key=len, reverse=True)
                            for i in range(0, len(g) - len(g) % batch, batch)]
        out = []
        while len(out) < n and any(queues.values()):  # the tasks take turns, group by group
            for task in sorted(queues):
                if queues[task] and len(out) < n:
                    out += queues[task].pop(0)
        return out
    if name == "tiny-text":
        from bench.quality import TEXT_PROMPTS

        return [(llm.encode(TEXT_PROMPTS[0]), None)] * n
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 8000, (32,), generator=g).tolist(), None)] * n


def score(row: Row, llm, canvas: list[int], example) -> None:
    done = finish(canvas, llm.tokenizer, llm.spec.stop_ids, llm.spec.mask_id, None)
    tally(row, len(done.token_ids), done.text, example)


def tally(row: Row, tokens: int, text: str, example) -> None:
    row.tokens += tokens
    if example is not None:
        from diffuserve.tools.train import task_data as tk

        ok = int(tk.CHECKERS[example.task](example.prompt, text.split()))
        row.checked += 1
        row.correct += ok
        tally_task = row.per_task.setdefault(example.task, [0, 0])
        tally_task[0] += ok
        tally_task[1] += 1


def method_of(llm, method: str):
    return METHODS[llm.default_method() if method == "vanilla" else method]


def vanilla_scaled(method: str, opts: DecodeOptions, vanilla_forwards: int, row: Row) -> tuple[DecodeOptions, float]:
    """-> (the options to run, the factor wall time, forwards and rows are scaled by). Vanilla's every forward is the
    same full canvas whatever the step count, so its time, forwards and rows for `steps` follow exactly from fewer
    steps (whole blocks): hours become minutes at 2048. Its tokens and answers are the shorter run's."""
    if method != "vanilla" or not 0 < vanilla_forwards < opts.n_steps:
        return opts, 1.0
    blocks = opts.gen_length // getattr(opts, "n_block", opts.gen_length)  # Dream's vanilla: one block
    run_opts = opts.with_(steps=max(1, vanilla_forwards // blocks) * blocks)
    row.extrapolated_from = run_opts.n_steps
    return run_opts, opts.n_steps / run_opts.n_steps


def run_reference(llm, method: str, opts: DecodeOptions, group, row: Row, vanilla_forwards: int = 0) -> None:
    """One request (batch 1) through the engine's step with a pool of one (engine.offline)."""
    m = method_of(llm, method)
    run_opts, scale = vanilla_scaled(method, opts, vanilla_forwards, row)
    prompt = torch.tensor([ids for ids, _ in group], dtype=torch.long)  # [B, L], equal lengths by construction
    with RowCounter(llm.model) as rc:
        t0 = time.perf_counter()
        res = offline.generate(llm.model, m, prompt, run_opts, torch.Generator().manual_seed(0))
        row.wall_s += (time.perf_counter() - t0) * scale
    row.forward_passes += round(res.forward_calls * scale)
    row.query_rows += round(rc.rows * scale)
    for b, (_, ex) in enumerate(group):
        score(row, llm, res.ids[b].tolist(), ex)


def run_engine(llm, method: str, opts: DecodeOptions, group, row: Row, vanilla_forwards: int = 0) -> None:
    """B concurrent requests of any method through the serving engine, as the server runs them."""
    import threading

    from diffuserve.engine.request import Request
    from diffuserve.engine.scheduler import Limits

    reqs, left, done = [], [len(group)], threading.Event()
    texts, tokens = defaultdict(str), {}

    def sink(out):  # the request's state is gone once it retires: keep what it emitted
        texts[out.request_id] += out.text
        if out.finished:
            tokens[out.request_id] = out.completion_tokens
            left[0] -= 1
            if not left[0]:
                done.set()

    opts, scale = vanilla_scaled(method, opts, vanilla_forwards, row)
    for i, (ids, _) in enumerate(group):
        reqs.append(Request(f"bench-{i}", ids, method_of(llm, method), opts, i, sink, llm.tokenizer,
                            llm.spec.stop_ids, llm.spec.mask_id))
    # A pool just big enough for this group (a sweep's many engines held many fixed 2 GiB pools until the cycle
    # collector ran), the server's limits.
    engine = offline.engine_for(llm.model, reqs, Limits())
    with RowCounter(llm.model) as rc:
        t0 = time.perf_counter()
        offline.run_to_idle(engine)  # driven here, synchronously: no thread hand-off in the timing
        row.wall_s += (time.perf_counter() - t0) * scale
    assert done.is_set()
    row.forward_passes += round(rc.calls * scale)  # model forwards (a verifier-only step of `guided` makes none)
    row.query_rows += round(rc.rows * scale)
    for r, (_, ex) in zip(reqs, group):
        assert r.phase.value == "finished", (r.request_id, r.phase)
        tally(row, tokens[r.request_id], texts[r.request_id], ex)
    assert engine.scheduler.pool.pages_in_use == 0, "a finished request kept KV pages"


def options_for(model: str, method: str, gen: int, overrides: dict | None = None,
                family: str = "llada") -> DecodeOptions | None:
    # overrides (from --window) go on top of the method's table entry; the table itself stays as defined
    name, table_entry = VANILLA[family] if method == "vanilla" else (method, METHOD_OPTIONS[method])
    m = METHODS[name]
    steps = {"steps": gen} if "steps" in m.options.field_names() else {}  # guided has no step budget
    opts = m.make_options({"gen_length": gen, **steps, **table_entry, **(overrides or {})})
    if method != "guided":
        return opts
    from diffuserve.engine.model.bundled import bundled_names

    verifier = VERIFIERS.get(model)
    return opts.with_(verifier=verifier) if verifier in bundled_names() else None


def fit_length(llm, name: str, group_prompts, asked: int, out) -> int:
    """The generation length to decode for `asked`: itself, or the longest canvas the model's positions allow
    beside the longest of `group_prompts`, in whole blocks of BLOCK (0: not even half of it fits)."""
    longest = max(len(ids) for ids, _ in group_prompts)
    gen = min(asked, (llm.spec.max_positions - longest) // BLOCK * BLOCK)
    if gen < asked:
        print(f"{name} gen {asked}: {gen} generated (prompt {longest} + {asked} > {llm.spec.max_positions} "
              f"positions){'' if 2 * gen >= asked else ': skipped'}", file=out, flush=True)
    return gen if 2 * gen >= asked else 0


def bench(models, lengths, batches, methods, n, out=sys.stderr, vanilla_forwards: int = 0,
          dtype: str = "float32", overrides: dict | None = None, prompts: str = "report") -> list[dict]:
    results = []
    for name in models:
        llm = load(name, dtype)
        for asked in lengths:
            for batch in batches:
                group_prompts = prompts_for(llm, name, n, batch, asked, prompts)
                gen = fit_length(llm, name, group_prompts, asked, out)
                if not gen:
                    continue
                if gen < asked:  # the answers that fit the shorter canvas
                    group_prompts = prompts_for(llm, name, n, batch, gen, prompts)
                rows = {}
                family = llm.spec.family
                for method in methods:
                    if method != "vanilla" and not METHODS[method].decodes(family):
                        continue  # the other family's (the default --methods names both families')
                    opts = options_for(name, method, gen, (overrides or {}).get(method), family)
                    if opts is None:
                        print(f"{name}: {method} skipped (no bundled verifier for this model)", file=out, flush=True)
                        continue
                    row = rows[method] = Row(name, gen, batch, method, asked_length=asked if gen < asked else 0)
                    for k in range(0, len(group_prompts), batch):
                        group = group_prompts[k:k + batch]
                        run = run_engine if method == "window" or batch > 1 else run_reference
                        run(llm, method, opts, group, row, vanilla_forwards)
                    d = row.as_dict(rows.get("vanilla"))
                    results.append(d)
                    print(f"{name} gen {gen} batch {batch} {method}: {d['tok_s']} tok/s, x{d['speedup']}, "
                          f"{row.forward_passes} passes, {d['rows_per_token']} rows/token, quality {d['quality']}",
                          file=out, flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| model | gen | batch | method | tok/s | speed-up | forward passes | rows / token | quality |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        q = "" if d["quality"] is None else f"{d['quality']:.1%} of {d['checked']}"
        if d.get("per_task"):
            q += " (" + ", ".join(f"{t} {c}/{k}" for t, (c, k) in sorted(d["per_task"].items())) + ")"
        passes = d["forward_passes"]
        if d.get("extrapolated_from"):
            passes = f"{passes} (scaled from {d['extrapolated_from']} steps per request)"
            q += f" (at {d['extrapolated_from']} steps)" if q else ""
        gen = f"{d['asked_length']} -> {d['gen_length']}" if d.get("asked_length") else d["gen_length"]
        lines.append(f"| {d['model']} | {gen} | {d['batch']} | `{d['method']}` | {d['tok_s']} | "
                     f"{d['speedup']}x | {passes} | {d['rows_per_token']} | {q} |")
    return "\n".join(lines)


def plot(results: list[dict], out_dir: str) -> list[str]:
    """speed-up vs generation length (per model, batch 1), and quality vs throughput (tiny-task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = sorted({d["model"] for d in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in METHOD_OPTIONS:
            pts = sorted((d["gen_length"], d["speedup"]) for d in results
                         if d["model"] == model and d["method"] == method and d["batch"] == 1 and d["speedup"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=f"{model} (batch 1)", xlabel="generation length", ylabel="speed-up over vanilla", xscale="log")
        ax.set_xticks(sorted({d["gen_length"] for d in results}), labels=sorted({d["gen_length"] for d in results}))
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{out_dir}/decode_speedup.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    task = [d for d in results if d["quality"] is not None]
    if task:
        from matplotlib.lines import Line2D

        fig, ax = plt.subplots(figsize=(7.5, 4))
        color = {m: f"C{i}" for i, m in enumerate(METHOD_OPTIONS)}  # a colour per method, a marker per length
        marker = dict(zip(sorted({d["gen_length"] for d in task}), "os^Dv"))
        for d in task:
            ax.scatter(d["tok_s"], 100 * d["quality"], color=color[d["method"]], marker=marker[d["gen_length"]],
                       s=40 if d["batch"] == 1 else 80, alpha=0.8)
        ax.set(title="tiny-task: quality vs throughput", xlabel="generated tokens/s", ylabel="exact match / valid %",
               xscale="log")
        handles = [Line2D([], [], color=color[m], marker="o", ls="", label=m) for m in METHOD_OPTIONS
                   if any(d["method"] == m for d in task)]
        handles += [Line2D([], [], color="gray", marker=mk, ls="", label=f"gen {g}") for g, mk in marker.items()]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        path = f"{out_dir}/decode_quality.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def parse_options(text: str) -> dict:
    """'threshold=0.9,active_tokens=8,refresh=full' -> the window method's options with their declared types."""
    from diffuserve.tools.cli import option_types

    out, names, parse = {}, METHODS["window"].options.field_names(), option_types()
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"--window: method 'window' has no option {key!r}; its options: "
                             f"{', '.join(sorted(names))}")
        out[key] = parse[key](value)  # the command line's parser of that option
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-task,tiny-text,random-100m")
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--methods", default=",".join(METHOD_OPTIONS))
    ap.add_argument("--n", type=int, default=8, help="prompts per (model, length, batch)")
    ap.add_argument("--vanilla-forwards", type=int, default=0,
                    help="run vanilla for about this many steps per request (whole blocks) and scale its time, "
                         "forwards and rows to the full step count: each of its forwards costs the same; its tokens "
                         "and answers are the shorter run's (0: run it all)")
    ap.add_argument("--prompts", default="report", choices=sorted(PROMPT_SEEDS),
                    help="tiny-task's held-out prompt set: report (tables) or tune (choosing defaults)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="every method runs in this dtype (bfloat16: about 5x faster forwards on CPUs with AMX)")
    ap.add_argument("--window", metavar="K=V,...", help="override our window mode's options, e.g. "
                    "threshold=0.9,active_tokens=8 (WindowOptions field names)")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--plot", help="write decode_speedup.png and decode_quality.png into this directory")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHOD_OPTIONS]
    if unknown or "vanilla" not in methods:
        ap.error(f"methods must include vanilla and come from {sorted(METHOD_OPTIONS)}; unknown: {unknown}")
    methods = ["vanilla"] + [m for m in methods if m != "vanilla"]  # the baseline first: speed-ups need it
    overrides = {"window": parse_options(args.window)} if args.window else None
    results = bench(args.models.split(","), [int(x) for x in args.lengths.split(",")],
                    [int(x) for x in args.batch.split(",")], methods, args.n, vanilla_forwards=args.vanilla_forwards,
                    dtype=args.dtype, overrides=overrides, prompts=args.prompts)
    md = table(results)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.plot:
        print("wrote", ", ".join(plot(results, args.plot)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
