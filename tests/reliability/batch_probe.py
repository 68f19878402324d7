"""Run as a script (by test_batch_invariance, in a process without the test suite's AVX2 pin, so that dtype `auto`
resolves as in a served process): tiny-text's default serving method at temperature 0, 10 prompts together and
each alone, with and without `engine.batch_invariant`; prints one JSON line of mismatch counts."""

from __future__ import annotations

import json
import time

from diffuserve.engine.config import build_config
from diffuserve.engine.decoding import get_method
from diffuserve.engine.llm import LLM
from diffuserve.engine.metrics import Metrics
from diffuserve.engine.request import Request
from diffuserve.server.app import build_engine

PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "KING LEAR.\n", "HAMLET.\nTo be, or not to be",
           "MACBETH.\nIs this a dagger", "OTHELLO.\n", "PORTIA.\nThe quality of mercy", "PUCK.\nIf we shadows",
           "LEAR.\nBlow, winds", "BRUTUS.\n"]


def batch(llm, invariant: bool, selected) -> tuple[dict[int, list[int]], float]:
    """The requests `selected`, submitted together to a fresh engine -> (tokens per request, wall seconds)."""
    cfg = build_config(None, model__path="tiny-text", engine__batch_invariant=invariant)
    engine, _ = build_engine(cfg, llm, Metrics("tiny-text"), start=False)
    method = get_method(cfg.decoding.default_method(llm.spec.family))
    opts = cfg.decoding.options_for(method, method.name).with_(gen_length=256)
    outs = {i: [] for i in selected}
    t0 = time.monotonic()
    for i in selected:
        engine.submit(Request(f"r{i}", llm.encode(PROMPTS[i]), method, opts, 0, outs[i].append, llm.tokenizer,
                              llm.spec.stop_ids, llm.spec.mask_id))
    while not engine.scheduler.idle:
        engine.step()
    return {i: [t for o in out for t in o.token_ids] for i, out in outs.items()}, time.monotonic() - t0


if __name__ == "__main__":
    served = build_config(None, model__path="tiny-text").model.dtype  # the default: auto
    llm = LLM("tiny-text", dtype=served)
    # Alone, a request's forward holds only its own rows in either mode: one run each serves both comparisons.
    alone = {i: batch(llm, False, [i])[0][i] for i in range(len(PROMPTS))}
    default, default_s = batch(llm, False, range(len(PROMPTS)))
    invariant, invariant_s = batch(llm, True, range(len(PROMPTS)))
    # the batch's wall time in each mode: what bit-stability costs (informative; the test asserts no time)
    print(json.dumps({"dtype": str(llm.model.dtype).removeprefix("torch."), "requests": len(PROMPTS),
                      "default_mode_mismatches": sum(default[i] != alone[i] for i in alone),
                      "invariant_mode_mismatches": sum(invariant[i] != alone[i] for i in alone),
                      "batch_wall_default_s": round(default_s, 1), "batch_wall_invariant_s": round(invariant_s, 1)}))
