"""Replaying reference cases (tests/fixtures/parity/*/cases.json) through our decoding methods.

A case names a method, a dtype, a seed, prompt ids and the reference function's keyword arguments; it passes when
our method returns exactly the reference's output ids and makes the same number of model forward calls. A method
that is not registered yet is reported as skipped, never as passed.

`run_file` runs the cases one by one (`engine.offline.generate`: the engine step with a pool of one);
`run_file_engine` submits every case of a file to one serving engine at once (one per dtype), so mixed methods,
prompt lengths, seeds and phases share every step, through the same scheduler and runner as the server. A case
with several prompt rows (the reference's own batch, whose rows some methods couple: Dream's commit count is a
mean over rows, Streaming-dLLM's mask ratio a sum) is one request whose state decodes those rows together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffuserve.engine import offline
from diffuserve.engine.decoding import METHODS, DecodeOptions
from diffuserve.engine.model import DTYPES, DiffusionLM, load_model
from diffuserve.engine.scheduler import Limits

# Reference keyword -> our option name. Keys mapped to None are output plumbing with no effect on tokens.
_RENAMES = {"max_new_tokens": "gen_length", "eos": "eos_id", "mask_id": None, "output_history": None,
            "return_dict_in_generate": None, "dual_cache": None}
# Defaults of the reference signatures where they differ from the methods' options (which serve requests).
_LLADA_DEFAULTS = {"steps": 128, "gen_length": 128, "block_length": 128}
_DREAM_DEFAULTS = {"steps": 512, "alg": "origin", "top_k": 50}  # top_k: transformers' legacy generation default
_DREAM_BLOCK_DEFAULTS = {"threshold": 0.9, "block_length": 32}


@dataclass
class CaseResult:
    case_id: str
    status: str  # "passed" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0


def case_options(case: dict, family: str, mask_id: int) -> DecodeOptions:
    params = dict(case["params"])
    if "mask_id" in params and params["mask_id"] != mask_id:
        raise ValueError(f"case mask_id {params['mask_id']} differs from the checkpoint's {mask_id}")
    defaults = dict(_LLADA_DEFAULTS) if family == "llada" else dict(_DREAM_DEFAULTS)
    if case["method"].startswith("fast_dllm_dream"):
        defaults.update(_DREAM_BLOCK_DEFAULTS)
    method = METHODS[case["method"]]
    known = method.options.field_names()
    opts = {}
    for key, value in {**defaults, **params}.items():
        name = _RENAMES.get(key, key)
        if name is None or (name not in known and key not in params):  # a default this method does not read
            continue
        if name not in known:
            raise ValueError(f"parameter {key!r} is not supported by diffuserve's {case['method']}")
        opts[name] = value
    return method.make_options(opts)


def first_difference(expected: list[list[int]], got: list[list[int]]) -> str:
    if len(expected) != len(got):
        return f"batch size {len(got)} != expected {len(expected)}"
    for r, (e, g) in enumerate(zip(expected, got)):
        for p, (a, b) in enumerate(zip(e, g)):
            if a != b:
                return f"row {r} position {p}: expected {a}, got {b}"
        if len(e) != len(g):
            return f"row {r} length {len(g)} != expected {len(e)} (first {min(len(e), len(g))} agree)"
    return ""


def check_result(case: dict, ids: list[list[int]], forward_calls: int, refresh_calls: int) -> str:
    """'' if the output matches the reference's, else what differs first."""
    detail = first_difference(case["output_ids"], ids)
    if not detail and "forward_calls" in case and case["forward_calls"] != forward_calls:
        detail = f"forward_calls {forward_calls} != expected {case['forward_calls']}"
    if not detail and "refresh_calls" in case and case["refresh_calls"] != refresh_calls:
        detail = f"refresh_calls {refresh_calls} != expected {case['refresh_calls']}"
    return detail


def run_case(case: dict, family: str, model: DiffusionLM) -> CaseResult:
    method = METHODS.get(case["method"])
    if method is None:
        return CaseResult(case["id"], "skipped", "method not implemented")
    t0 = time.monotonic()
    try:
        opts = case_options(case, family, model.spec.mask_id)
        gen = torch.Generator().manual_seed(int(case.get("seed", 0)))
        prompt = torch.tensor(case["prompt_ids"], dtype=torch.long)
        result = offline.generate(model, method, prompt, opts, gen)
    except Exception as exc:  # a crash is a failure of that case, not of the run
        return CaseResult(case["id"], "failed", f"error: {type(exc).__name__}: {exc}", time.monotonic() - t0)
    detail = check_result(case, result.ids.tolist(), result.forward_calls, result.refresh_calls)
    return CaseResult(case["id"], "failed" if detail else "passed", detail, time.monotonic() - t0)


ROWS_PER_STEP = 512


@dataclass
class EngineRun:
    """What sharing looked like: batched forwards run and the most requests one of them computed."""

    steps: int = 0
    most_per_step: int = 0
    shared_steps: int = 0  # forwards that computed more than one request


def run_engine(cases: list[dict], family: str, model: DiffusionLM, run: EngineRun | None = None) -> list[CaseResult]:
    """Submit every case at once to one engine over `model` and step it until all are done."""
    t0, results, reqs = time.monotonic(), {}, []
    for case in cases:
        method = METHODS.get(case["method"])
        if method is None:
            results[case["id"]] = CaseResult(case["id"], "skipped", "method not implemented")
            continue
        try:
            opts = case_options(case, family, model.spec.mask_id)
        except ValueError as exc:
            results[case["id"]] = CaseResult(case["id"], "failed", f"error: {exc}")
            continue
        rows, outs = case["prompt_ids"], []
        seed = int(case.get("seed", 0))
        reqs.append((case, outs, offline.Kept(case["id"], rows[0], method, opts, seed, outs.append,
                                              batch_prompts=rows if len(rows) > 1 else None)))
    n = max(1, len(reqs))
    # The reference loops read every row's logits (a [rows, vocab] block in float64: ~1.2 MB a row at Dream's
    # vocabulary): a row budget keeps a step's logits under a gigabyte; the rest wait their turn, as in a server.
    limits = Limits(max_running=n, max_waiting=n, max_rows_per_step=ROWS_PER_STEP)
    engine = offline.engine_for(model, [r for _, _, r in reqs], limits)
    runner, run = engine.runner, run if run is not None else EngineRun()
    step = runner.step

    def counted(work):  # how many requests each forward computed
        run.steps += 1
        run.most_per_step = max(run.most_per_step, len(work))
        run.shared_steps += len(work) > 1
        return step(work)

    runner.step = counted
    offline.run_to_idle(engine)
    for case, outs, req in reqs:
        last = outs[-1] if outs else None
        if last is None or last.error is not None or req.kept is None:
            detail = f"error: {'no output' if last is None else last.error or 'no decoding state'}"
        else:
            res = req.kept.result()
            detail = check_result(case, res.ids.tolist(), res.forward_calls, res.refresh_calls)
        results[case["id"]] = CaseResult(case["id"], "failed" if detail else "passed", detail, time.monotonic() - t0)
    return [results[c["id"]] for c in cases]


def run_file_engine(path: str | Path, only: Callable[[dict], bool] | None = None,
                    report: Callable[[CaseResult], None] | None = None,
                    run: EngineRun | None = None) -> list[CaseResult]:
    """Every case of the file (of each dtype) in one engine at once; results in the file's order."""
    path = Path(path)
    spec = json.loads(path.read_text())
    cases = [c for c in spec["cases"] if only is None or only(c)]
    by_id = {}
    for dtype in dict.fromkeys(c["dtype"] for c in cases):
        model = load_model((path.parent / spec["model"]).resolve(), DTYPES[dtype])
        for res in run_engine([c for c in cases if c["dtype"] == dtype], spec["family"], model, run):
            by_id[res.case_id] = res
    results = [by_id[c["id"]] for c in cases]
    for res in results if report else ():
        report(res)
    return results


def run_file(path: str | Path, only: Callable[[dict], bool] | None = None,
             report: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    path = Path(path)
    spec = json.loads(path.read_text())
    family = spec["family"]
    model_dir = (path.parent / spec["model"]).resolve()
    models: dict[str, DiffusionLM] = {}
    results = []
    for case in spec["cases"]:
        if only is not None and not only(case):
            continue
        if case["method"] in METHODS and case["dtype"] not in models:
            models[case["dtype"]] = load_model(model_dir, DTYPES[case["dtype"]])
        res = run_case(case, family, models.get(case["dtype"]))
        results.append(res)
        if report:
            report(res)
    return results


def summary(results: list[CaseResult]) -> str:
    passed = sum(r.status == "passed" for r in results)
    failed = sum(r.status == "failed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    return f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
