"""The engine loop, scheduler and window bookkeeping with a fake runner (no model), then batch invariance on the
bundled model."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import small_spec
from diffuserve.engine.decoding import get_method
from diffuserve.engine.decoding.window import WindowOptions
from diffuserve.engine.engine import Engine
from fake_runner import FakeModel, FakeRunner
from diffuserve.engine.model.kv_pool import KVPool
from diffuserve.engine.request import Request, RequestStatus
from diffuserve.engine.scheduler import Limits, QueueFull, Scheduler

SPEC = small_spec("llada")
FAULT = 7


def script(prompt: list[int]) -> list[int]:
    """Each prompt's scripted answer: a run of tokens that depends on the prompt, then EOS."""
    n = 5 + 3 * (prompt[0] % 7)
    return [(prompt[0] + 11 * k) % 250 + 20 for k in range(n)]


def make_engine(pages: int = 200, delay: float = 0.0, **limits) -> Engine:
    pool = KVPool(1, 1, 1, pages, 16, torch.float32)
    runner = FakeRunner(SPEC, script, delay=delay, fault_token=FAULT)
    return Engine(FakeModel(SPEC), Scheduler(Limits(**limits), pool), runner)


def make_request(i: int, prompt: list[int], outs: dict, gen_length: int = 48, **opts) -> Request:
    o = WindowOptions(gen_length=gen_length, window_tokens=16, active_tokens=4, refresh_cycle=4, threshold=0.9,
                      **opts)
    outs[i] = []
    return Request(f"r{i}", prompt, get_method("window"), o, i, outs[i].append, None, SPEC.stop_ids, SPEC.mask_id)


def run_until_idle(engine: Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if engine.scheduler.idle:
            return
        engine.step()
    raise AssertionError("engine did not become idle")


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_batched_requests_of_mixed_lengths_get_their_scripts():
    engine, outs = make_engine(), {}
    rng = random.Random(0)
    prompts = [[rng.randrange(20, 250) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    for i, p in enumerate(prompts):
        engine.submit(make_request(i, p, outs, gen_length=rng.choice([32, 48, 64])))
    run_until_idle(engine)
    for i, p in enumerate(prompts):
        assert tokens(outs[i]) == script(p), i
        assert outs[i][-1].finished and outs[i][-1].finish_reason == "stop"
        assert outs[i][-1].completion_tokens == len(script(p))
    assert max(engine.runner.batches) == 12  # every request shared the same forwards
    assert engine.scheduler.pool.pages_in_use == 0 and engine.scheduler.leaks() is None


def test_injected_fault_fails_only_its_request():
    engine, outs = make_engine(), {}
    prompts = [[30, 31], [FAULT, 40, 41], [50]]
    for i, p in enumerate(prompts):
        engine.submit(make_request(i, p, outs))
    run_until_idle(engine)
    assert outs[1][-1].finish_reason == "error" and "injected fault" in outs[1][-1].error
    for i in (0, 2):
        assert tokens(outs[i]) == script(prompts[i]) and outs[i][-1].finish_reason == "stop"
    assert engine.scheduler.pool.pages_in_use == 0


def test_aborts_at_step_boundaries_free_everything():
    engine, outs = make_engine(max_running=2), {}
    reqs = [make_request(i, [60 + i], outs, gen_length=64) for i in range(4)]
    for r in reqs:
        engine.submit(r)
    engine.step()
    assert [r.phase for r in reqs] == [RequestStatus.RUNNING] * 2 + [RequestStatus.WAITING] * 2
    engine.abort(reqs[0])  # running
    engine.abort(reqs[3])  # still queued
    engine.step()
    assert reqs[0].phase is RequestStatus.ABORTED and reqs[0].kv is None
    assert reqs[3].phase is RequestStatus.ABORTED and reqs[3] not in engine.scheduler.waiting
    assert outs[0][-1].finish_reason == outs[3][-1].finish_reason == "abort"
    run_until_idle(engine)
    assert tokens(outs[1]) == script([61]) and tokens(outs[2]) == script([62])
    assert engine.scheduler.pool.pages_in_use == 0 and engine.scheduler.leaks() is None


def test_deadline_ends_a_request_with_timeout():
    engine, outs = make_engine(), {}
    late = make_request(0, [70], outs, gen_length=64)
    late.deadline = 0.0  # already past
    engine.submit(late)
    engine.submit(make_request(1, [71], outs))
    run_until_idle(engine)
    assert outs[0][-1].finish_reason == "timeout" and tokens(outs[1]) == script([71])


def test_overload_refuses_exactly_the_extra_requests():
    R, Q, K = 3, 5, 4
    engine, outs = make_engine(max_running=R, max_waiting=Q), {}
    accepted, refused = [], 0
    for i in range(R + Q + K):
        if i == R:
            engine.step()  # the first R are admitted, the queue is empty again
        try:
            engine.submit(make_request(i, [80 + i], outs))
            accepted.append(i)
        except QueueFull:
            refused += 1
    assert refused == K and len(accepted) == R + Q
    run_until_idle(engine)
    assert all(outs[i][-1].finish_reason == "stop" for i in accepted)


def test_kv_budget_admits_first_come_first_served():
    # 9 pages of 16 slots (page 0 is scratch): a 120-slot canvas takes 8 pages, so one runs at a time, in order.
    engine, outs = make_engine(pages=9), {}
    for i in range(3):
        engine.submit(make_request(i, [90 + i] * 8, outs, gen_length=112))
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["r0"]
    order = []
    while not engine.scheduler.idle:
        engine.step()
        order += [o.request_id for i in outs for o in outs[i] if o.finished and o.request_id not in order]
    assert order == ["r0", "r1", "r2"]


def test_row_budget_splits_a_step_but_every_request_finishes():
    engine, outs = make_engine(max_rows_per_step=40), {}
    for i in range(6):
        engine.submit(make_request(i, [100 + i] * 10, outs))
    run_until_idle(engine)
    assert max(engine.runner.batches) < 6
    assert all(tokens(outs[i]) == script([100 + i] * 10) for i in range(6))


def test_refresh_and_pruned_steps_share_a_forward():
    engine, outs = make_engine(), {}
    engine.submit(make_request(0, [110], outs, gen_length=64))
    engine.step()
    engine.step()  # r0 is now in a pruned phase
    engine.submit(make_request(1, [111], outs, gen_length=64))
    phases = []
    orig = engine.runner.step

    def spy(work):
        phases.append(sorted("refresh" if plan.refresh else "pruned" for _, plan in work))
        return orig(work)

    engine.runner.step = spy
    engine.step()
    assert phases[0] == ["pruned", "refresh"]


def test_mailbox_holds_a_steps_outputs_until_it_ends_then_waits_for_the_loop():
    """Outputs posted on the engine thread reach their queues in order, held until the step ends (settle): the
    loop wakes once per step for all of them, and settle returns once they are delivered. A post from any other
    thread (a rejection at submit) is delivered without a step."""
    import asyncio
    import threading

    from diffuserve.engine.engine import Mailbox
    from diffuserve.engine.request import RequestOutput

    async def main():
        loop = asyncio.get_running_loop()
        queues, seen = [asyncio.Queue() for _ in range(4)], []
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakeups.append(fn), real(fn, *a))[1]

        def engine():  # what three engine steps' emits do
            for step in range(3):
                for i, q in enumerate(queues):
                    box.post(q, RequestOutput(f"r{i}", f"{step}", [step], []))
                held = [q.qsize() for q in queues]
                box.settle(5.0)
                seen.append((held, [q.qsize() for q in queues]))

        thread = threading.Thread(target=engine)
        box = Mailbox(loop, thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        got = [[(await q.get()).text for _ in range(3)] for q in queues]
        steps_wakeups = sum(getattr(fn, "__func__", None) is Mailbox._deliver for fn in wakeups)
        box.post(queues[0], RequestOutput("x", "rejected", [], []))  # from the loop's own thread
        late = await asyncio.wait_for(queues[0].get(), 5.0)
        return got, seen, steps_wakeups, late.text

    got, seen, wakeups, late = asyncio.run(main())
    assert got == [["0", "1", "2"]] * 4
    assert seen == [([s] * 4, [s + 1] * 4) for s in range(3)]  # held during the step, delivered when settle returns
    assert wakeups == 3  # one per step, for 4 requests' outputs each
    assert late == "rejected"


# -- the real model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    from diffuserve.engine.llm import LLM

    return LLM("tiny-text")


def test_engine_output_equals_offline_window_and_is_batch_invariant(llm):
    """At temperature 0 (float32, CPU) a request's tokens are the same alone, in a batch with companions of other
    prompt lengths and options, and through the offline `window` driver; so are a sampled request's (temperature
    0.7: the runner draws every sampled segment's tokens in one op, each from its request's own generator)."""
    from diffuserve.engine.runner import ModelRunner

    pool = KVPool.for_model(llm.model, 64 << 20)
    engine = Engine(llm.model, Scheduler(Limits(), pool), ModelRunner(llm.model, pool))
    base = WindowOptions(gen_length=48, window_tokens=24, active_tokens=6, refresh_cycle=6)
    variants = [base, base.with_(threshold=0.7), base.with_(refresh="full"), base.with_(gen_length=32, steps=16),
                base.with_(temperature=0.7), base.with_(temperature=1.0, threshold=0.5)]
    prompts = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "KING LEAR.\n", "HAMLET.\nTo be, or not to be",
               "MACBETH.\n", "OTHELLO.\nIt is the cause"]
    jobs = [(llm.encode(p), variants[i % len(variants)]) for i, p in enumerate(prompts)]

    def run(selected):
        outs = {}
        for i in selected:
            ids, opts = jobs[i]
            outs[i] = []
            engine.submit(Request(f"r{i}", ids, get_method("window"), opts, 0, outs[i].append, llm.tokenizer,
                                  llm.spec.stop_ids, llm.spec.mask_id))
        run_until_idle(engine)
        return {i: (tokens(o), "".join(x.text for x in o)) for i, o in outs.items()}

    together = run(range(len(jobs)))
    mismatches = 0
    for i, (ids, opts) in enumerate(jobs):
        alone = run([i])[i]
        offline = llm.generate(ids, "window", opts, seed=0).completion
        assert alone == (offline.token_ids, offline.text)
        mismatches += together[i] != alone
    print(f"FIGURE batch_invariance_mismatches={mismatches}/{len(jobs)}")
    assert mismatches == 0
    assert pool.pages_in_use == 0
