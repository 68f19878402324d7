"""Replaying reference cases (tests/fixtures/parity/*/cases.json) through our decoding methods.

A case names a method, a dtype, a seed, prompt ids and the reference function's keyword arguments; it passes when
our method returns exactly the reference's output ids and makes the same number of model forward calls. A method
that is not registered yet is reported as skipped, never as passed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .decoding import METHODS, DecodeOptions
from .model import DTYPES, DiffusionLM, load_model

# Reference keyword -> our option name. Keys mapped to None are output plumbing with no effect on tokens.
_RENAMES = {"max_new_tokens": "gen_length", "mask_id": None, "output_history": None,
            "return_dict_in_generate": None, "dual_cache": None}
# Defaults of the reference signatures where they differ from DecodeOptions'.
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
    known = DecodeOptions.field_names()
    opts = {}
    for key, value in {**defaults, **params}.items():
        name = _RENAMES.get(key, key)
        if name is None:
            continue
        if name not in known:
            raise ValueError(f"parameter {key!r} is not supported by diffuserve's {case['method']}")
        opts[name] = value
    return DecodeOptions(**opts)


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


def run_case(case: dict, family: str, model: DiffusionLM) -> CaseResult:
    method = METHODS.get(case["method"])
    if method is None:
        return CaseResult(case["id"], "skipped", "method not implemented")
    t0 = time.monotonic()
    try:
        opts = case_options(case, family, model.spec.mask_id)
        gen = torch.Generator().manual_seed(int(case.get("seed", 0)))
        prompt = torch.tensor(case["prompt_ids"], dtype=torch.long)
        result = method.generate(model, prompt, opts, gen)
    except Exception as exc:  # a crash is a failure of that case, not of the run
        return CaseResult(case["id"], "failed", f"error: {type(exc).__name__}: {exc}", time.monotonic() - t0)
    got = result.ids.tolist()
    detail = first_difference(case["output_ids"], got)
    if not detail and "forward_calls" in case and case["forward_calls"] != result.forward_calls:
        detail = f"forward_calls {result.forward_calls} != expected {case['forward_calls']}"
    if not detail and "refresh_calls" in case and case["refresh_calls"] != result.refresh_calls:
        detail = f"refresh_calls {result.refresh_calls} != expected {case['refresh_calls']}"
    return CaseResult(case["id"], "failed" if detail else "passed", detail, time.monotonic() - t0)


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
