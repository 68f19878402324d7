"""The `diffuserve` command: generate, conformance, serve.

Decoding flags are generated from the methods' declared options, so every knob a method reads is settable from the
command line without a hand-kept list (`--gen-length`, `--threshold`, ...); a flag the chosen method does not read
is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from diffuserve.engine.decoding import METHODS
from diffuserve.engine.decoding.options import all_fields

from .serve_flags import add_serve_flags

_BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}") from None


def option_types() -> dict[str, type]:
    """Every option any method declares -> its argparse type."""
    return {name: _parse_bool if t is bool else t for name, t in all_fields(m.options for m in METHODS.values()).items()}


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding options (defaults: the chosen method's reference defaults; each method "
                             "reads its own)")
    g.add_argument("--method", choices=sorted(METHODS) + ["vanilla"],
                   help="decoding method (default, or vanilla: the family's reference sampler)")
    g.add_argument("--seed", type=int, default=0)
    for name, kind in sorted(option_types().items()):
        g.add_argument("--" + name.replace("_", "-"), dest="opt_" + name, type=kind, default=None,
                       metavar=name.upper())


def decoding_options(args: argparse.Namespace) -> dict:
    """The decoding flags given -> name -> value (LLM.generate builds the method's options from them)."""
    given = {name: getattr(args, "opt_" + name) for name in option_types()}
    return {k: v for k, v in given.items() if v is not None}


def cmd_generate(args: argparse.Namespace) -> int:
    from diffuserve.engine.llm import LLM

    llm = LLM(args.model, args.dtype, args.device)
    if args.prompt_ids:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif args.prompt is not None:
        ids = llm.encode(args.prompt, chat=args.chat)
    else:
        print("error: give --prompt or --prompt-ids", file=sys.stderr)
        return 2
    out = llm.generate(ids, args.method, decoding_options(args), seed=args.seed)
    if args.json:
        print(json.dumps({"method": out.method, "prompt_ids": out.prompt_ids, "ids": out.canvas_ids,
                          "completion_ids": out.completion.token_ids, "text": out.completion.text,
                          "finish_reason": out.completion.finish_reason, "forward_passes": out.forward_calls,
                          "wall_time_s": round(out.wall_time_s, 4)}))
    else:
        print(out.completion.text if llm.tokenizer is not None else " ".join(map(str, out.completion.token_ids)))
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import EngineRun, run_file, run_file_engine, summary

    def report(r):
        if r.status != "passed" or args.verbose:
            print(f"{r.case_id}: {r.status}: {r.detail or f'{r.seconds:.1f}s'}", flush=True)

    only = (lambda c: c["method"] in args.methods.split(",")) if args.methods else None
    if args.engine:
        run = EngineRun()
        results = run_file_engine(args.cases, only=only, report=report, run=run)
        print(f"engine: {run.steps} batched steps, {run.shared_steps} of them computed more than one request, up "
              f"to {run.most_per_step} at once")
    else:
        results = run_file(args.cases, only=only, report=report)
    print(summary(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.recipe == "text":
        from .train.tiny_text import run
    elif args.recipe == "text-ar":
        from .train.tiny_ar import run
    elif args.recipe == "task-ar":
        from .train.tiny_ar import run_task as run
    else:
        from functools import partial

        from .train.tiny_task import run
        run = partial(run, family="dream" if args.recipe == "task-dream" else "llada")
    work = Path(args.work or f".train-work/{args.recipe}")
    record = run(Path(args.out), work, steps=args.steps, seed=args.seed)
    print(json.dumps({k: v for k, v in record.items() if k != "log"}))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffuserve.engine.model.bundled import resolve_model
    from .prune import PruneConfig, decoded_quality, run

    src, out = Path(resolve_model(args.model)), Path(args.out)
    try:
        cfg = PruneConfig(args.sparsity, args.method, args.structure, args.samples, args.seed)
        report = run(src, out, cfg, args.calib)
    except ValueError as exc:
        raise SystemExit(f"diffuserve prune: {exc}") from None
    if args.quality_n > 0 and args.calib == "task":
        report["quality_method"] = args.quality_method
        report["decoded_before"] = decoded_quality(src, args.quality_method, args.quality_n)
        report["decoded_after"] = decoded_quality(out, args.quality_method, args.quality_n)
    (out / "prune_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("diffuserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def cmd_serve(args: argparse.Namespace) -> int:
    from diffuserve.server.app import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffuserve", description="Serving engine for diffusion language models")
    p.add_argument("--version", action="version", version=f"diffuserve {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate once from a prompt and print the result")
    g.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    g.add_argument("--prompt", help="prompt text (needs tokenizer files)")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    g.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "float64", "auto"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true", help="print ids, text, forward passes and wall time as JSON")
    add_decoding_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("conformance", help="replay reference cases (cases.json) and compare token for token")
    c.add_argument("cases", help="path to a cases.json file")
    c.add_argument("--methods", help="only these methods (comma-separated)")
    c.add_argument("--engine", action="store_true",
                   help="submit every case to one serving engine at once (mixed methods sharing its steps)")
    c.add_argument("-v", "--verbose", action="store_true")
    c.add_argument("--native-cpu", action="store_true",
                   help="keep this CPU's best torch kernels instead of AVX2 (float32 cases may then differ)")
    c.set_defaults(func=cmd_conformance)

    t = sub.add_parser("train", help="train a bundled model from scratch (resumable)")
    t.add_argument("recipe", choices=["text", "text-ar", "task", "task-dream", "task-ar"],
                   help="task-dream: tiny-task's recipe in the Dream layout")
    t.add_argument("--out", required=True, help="output model directory")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--work", help="work directory for corpus, tokenizer and checkpoints (default .train-work/)")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prune", help="prune a checkpoint's weights offline (magnitude, Wanda, sink-aware)")
    pr.add_argument("--model", required=True, help="checkpoint directory or bundled model name")
    pr.add_argument("--out", required=True, help="output checkpoint directory")
    pr.add_argument("--sparsity", type=float, default=0.5)
    pr.add_argument("--method", default="sink-aware", choices=["magnitude", "wanda", "sink-aware"])
    pr.add_argument("--structure", default="unstructured", choices=["unstructured", "2:4"])
    pr.add_argument("--calib", default="task", help="'task' (tiny-task rows) or a UTF-8 text file")
    pr.add_argument("--samples", type=int, default=32, help="calibration samples (each at 10 noise levels)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--quality-method", default="window", help="decoding method of the before/after report")
    pr.add_argument("--quality-n", type=int, default=20, help="held-out task examples decoded (0: skip)")
    pr.set_defaults(func=cmd_prune)

    s = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                       description="Start the OpenAI-compatible HTTP server. Every config field is a flag; "
                       "precedence: flag, then DIFFUSERVE_* environment, then --config YAML, then the default.")
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)
    return p


def _pin_cpu_kernels(argv: list[str]) -> None:
    """Re-run `conformance` with torch's AVX2 kernels, the level the reference fixtures were produced at (float32
    reductions round differently under AVX-512); torch reads the variable only when it loads, hence the exec."""
    if "ATEN_CPU_CAPABILITY" in os.environ or "--native-cpu" in argv:
        return
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    os.execv(sys.executable, [sys.executable, "-m", "diffuserve.tools.cli", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["conformance"]:
        _pin_cpu_kernels(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
