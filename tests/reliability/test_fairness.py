"""Issue 33's fairness finding: no request, and no body's n choices, can take the engine from the others.

The real tiny-task model and engine, stepped synchronously (`Engine.step`), with a row budget small enough that the
hostile shapes oversubscribe it: a body of n window choices that recompute their whole 1,000-token canvas every step
(active = window = refresh_cycle = 1, refresh full, threshold 1.0) and a vanilla `llada` request, beside default
streams. Each step records which requests the batched forward computed; a default stream must be computed at every
step it runs (it waits no step), and every hostile choice must still progress (nothing starves).
"""

from __future__ import annotations

import itertools

import pytest

from diffuserve.engine.config import build_config
from diffuserve.engine.decoding import METHODS
from diffuserve.engine.request import Request, RequestStatus

from .ledger import figure

BUDGET = 2048  # rows per step: the 8 hostile choices alone want 8 x ~1010


@pytest.fixture(scope="module")
def engine():
    from diffuserve.engine.llm import LLM
    from diffuserve.engine.metrics import Metrics
    from diffuserve.server.app import build_engine

    llm = LLM("tiny-task")
    cfg = build_config(None, model__path="tiny-task", engine__max_rows_per_step=BUDGET)
    eng, _ = build_engine(cfg, llm, Metrics("tiny-task"), start=False)
    eng.llm = llm
    yield eng


def make(llm, rid: str, method: str, group: str, **opts) -> Request:
    ids = llm.encode("count down from w6 x1 y1 z2", chat=True)  # a tiny-task prompt: 41, 40, ..., 1
    return Request(rid, ids, METHODS[method], opts, seed=0, sink=lambda out: None, tokenizer=llm.tokenizer,
                   stop_ids=llm.spec.stop_ids, mask_id=llm.spec.mask_id, group=group)


def test_no_request_or_body_takes_the_engine_from_the_others(engine):
    llm = engine.llm
    hostile = [make(llm, f"hostile-{k}", "window", "hostile", gen_length=1000, active_tokens=1, window_tokens=1,
                    refresh_cycle=1, refresh="full", threshold=1.0,
                    eos_early_exit=False) for k in range(8)]
    vanilla = make(llm, "vanilla", "llada", "vanilla", gen_length=128)
    streams = [make(llm, f"stream-{k}", "window", f"stream-{k}", gen_length=64) for k in range(6)]
    late = make(llm, "late", "window", "late", gen_length=16)
    computed: list[set[str]] = []
    rows: list[int] = []
    step = engine.runner.step

    running_at: list[set[str]] = []  # per forward: the requests running then (admitted, not finished)

    def recording(batch):
        owners = {id(r.kv): r.request_id for r in engine.scheduler.running}
        running_at.append({r.request_id for r in engine.scheduler.running if r.phase is RequestStatus.RUNNING})
        computed.append({owners[id(kv)] for kv, _ in batch})
        rows.append(sum(p.rows for _, p in batch))
        return step(batch)

    engine.runner.step = recording
    try:
        for req in hostile + [vanilla] + streams:  # the hostile body first: it is admitted (and ordered) first
            engine.submit(req)
        for n in range(150):
            if n == 3:
                engine.submit(late)
            engine.step()
            if all(r.phase is not RequestStatus.RUNNING for r in streams + [late]):
                break
    finally:
        engine.runner.step = step
        for req in itertools.chain(hostile, [vanilla], streams, [late]):
            engine.abort(req)
        engine.step()

    def longest_wait(rid: str) -> int:
        """The most steps in a row `rid` was running (admitted, not finished) and not computed."""
        worst = run = 0
        for got, was in zip(computed, running_at):
            if rid in was and rid not in got:
                run += 1
                worst = max(worst, run)
            elif rid in got:
                run = 0
        return worst

    others = [r.request_id for r in streams + [vanilla, late]]
    waits = {rid: longest_wait(rid) for rid in others}
    hostile_steps = [sum(h.request_id in got for got in computed) for h in hostile]
    figure("hostile_shapes", steps=len(computed), worst_stall_steps=max(waits.values()),
           hostile_forwards_min=min(hostile_steps), hostile_forwards_max=max(hostile_steps),
           rows_per_step_max=max(rows), row_budget=BUDGET)
    assert all(r.phase is RequestStatus.FINISHED for r in streams + [late]), [r.phase for r in streams + [late]]
    assert max(waits.values()) == 0, f"a stream waited while the hostile body ran: {waits}"
    assert min(hostile_steps) >= 2, f"a hostile choice starved: {hostile_steps}"
    # a step computes the budget plus at most one request over it (the longest-waiting large one)
    assert max(rows) <= BUDGET + max(len(h.prompt_ids) + 1000 for h in hostile)


HOSTILE_KNOBS = dict(steps=None, threshold=1.0, active_tokens=1, window_tokens=1, refresh_cycle=1, refresh="full",
                     block_length=1, eos_early_exit=False, early_stop=False)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_no_knob_setting_costs_more_than_two_forwards_per_token(family):
    """Every method's total cost is bounded whatever knobs a body sets: at most two forwards per generated position
    (the block caches' worst case, block_length 1: one forward builds the cache, one commits), each of at most the
    canvas's rows; with `steps` at most max_tokens (routes) and the canvas at most the context."""
    from pathlib import Path

    from diffuserve.engine.llm import LLM

    parity = Path(__file__).parents[1] / "fixtures" / "parity" / "dream-tiny" / "model"
    llm = LLM("tiny-task") if family == "llada" else LLM(str(parity))
    ids = llm.encode("count down from w6 x1 y1 z2", chat=True) if family == "llada" else [5, 6, 7, 8]
    gen, worst = 24, {}
    for name, m in sorted(METHODS.items()):
        if not m.decodes(family) or name == "score":
            continue
        declared = m.options.field_names()
        knobs = {k: v for k, v in HOSTILE_KNOBS.items() if k in declared and v is not None}
        if name == "guided":
            if family != "llada":
                continue
            knobs["verifier"] = "tiny-task-ar"
        out = llm.generate(ids, name, {"gen_length": gen, **knobs}, seed=0)
        worst[name] = out.forward_calls
    figure(f"cost_bound_{family}", gen_length=gen, **{f"forwards_{k}": v for k, v in worst.items()})
    assert worst and max(worst.values()) <= 2 * gen, worst


def test_one_body_cannot_take_every_running_slot(engine):
    """A body of n = running slots would hold them all until its last choice finished (a second client got nothing
    for 60 s): a body holds at most half, and a request sent after it is admitted into the rest at the next step."""
    llm, slots = engine.llm, engine.scheduler.limits.max_running
    body = [make(llm, f"n-{k}", "window", "body", gen_length=256, eos_early_exit=False) for k in range(slots)]
    single = make(llm, "single", "window", "single", gen_length=16)
    try:
        for req in body:
            engine.submit(req)
        engine.step()
        engine.submit(single)
        engine.step()
        held = sum(r.phase is RequestStatus.RUNNING for r in body)
        figure("body_slots", running_slots=slots, n=len(body), body_running=held,
               later_request_admitted=int(single.phase is not RequestStatus.WAITING))
        assert held == slots // 2 and single.phase is not RequestStatus.WAITING
        while single.phase is RequestStatus.RUNNING:
            engine.step()
        assert single.phase is RequestStatus.FINISHED
        # the body's waiting choices are admitted as its own finish (or are aborted below)
        assert sum(r.phase is RequestStatus.WAITING for r in body) == slots - slots // 2
    finally:
        for req in body + [single]:
            engine.abort(req)
        engine.step()
        assert engine.scheduler.idle
