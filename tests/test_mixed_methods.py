"""Every method is a row of the same engine step: a reference `llada` request beside `window` streams on the real
tiny-task model advances every step, and a disconnect or the request deadline ends it at a step boundary."""

from __future__ import annotations

import time

import pytest

from diffuserve.engine.decoding import get_method
from diffuserve.engine.engine import Engine
from diffuserve.engine.model.bundled import bundled_names
from diffuserve.engine.model.kv_pool import KVPool
from diffuserve.engine.request import Request, RequestStatus
from diffuserve.engine.runner import ModelRunner
from diffuserve.engine.scheduler import Limits, Scheduler
from diffuserve.tools.train import task_data as tk

pytestmark = pytest.mark.skipif("tiny-task" not in bundled_names(), reason="tiny-task is not in this checkout")
LLADA = dict(gen_length=512, steps=512)  # one token per step: 512 full forwards to the end
WINDOW = dict(gen_length=256, threshold=0.95, active_tokens=16)


@pytest.fixture(scope="module")
def llm():
    from diffuserve.engine.llm import LLM

    return LLM("tiny-task", dtype="float32")


def _engine(llm, max_rows: int = 1 << 20) -> tuple[Engine, list]:
    pool = KVPool.for_model(llm.model, 64 << 20)
    runner = ModelRunner(llm.model, pool)
    computed = []  # per step: the KV handles of the requests it computed
    step = runner.step

    def spy(work):
        computed.append([id(handle) for handle, _ in work])
        return step(work)

    runner.step = spy
    return Engine(llm.model, Scheduler(Limits(max_rows_per_step=max_rows), pool), runner), computed


def _submit(engine, llm, name: str, method: str, opts: dict, words: str, outs: list, **kw) -> Request:
    req = Request(name, llm.encode(words, chat=True), get_method(method), opts, 0, outs.append, llm.tokenizer,
                  llm.spec.stop_ids, llm.spec.mask_id, **kw)
    engine.submit(req)
    return req


def _count(n: int) -> str:
    return " ".join(["count", "down", "from", *tk.num(n)])


def _mix(llm, engine, **llada_kw):
    outs = {i: [] for i in range(5)}
    streams = [_submit(engine, llm, f"w{i}", "window", WINDOW, _count(20 + i), outs[i]) for i in range(4)]
    slow = _submit(engine, llm, "slow", "llada", LLADA, _count(40), outs[4], **llada_kw)
    return streams, slow, outs


@pytest.mark.parametrize("max_rows", [1 << 20, 600])
def test_llada_shares_every_step_with_window_streams_and_aborts_within_a_step(llm, max_rows):
    """max_rows 600: the llada request's full canvas (~530 rows) and the streams' do not all fit one step, so one
    of them waits; none waits two steps in a row."""
    engine, computed = _engine(llm, max_rows)
    streams, slow, outs = _mix(llm, engine)
    everyone = streams + [slow]
    waited = {id(r): 0 for r in everyone}
    for _ in range(30):
        engine.step()
        running = [r for r in everyone if r.phase is RequestStatus.RUNNING]
        assert slow in running
        for r in running:
            waited[id(r)] = 0 if id(r.kv) in computed[-1] else waited[id(r)] + 1
            assert waited[id(r)] <= 1, f"{r.request_id} waited two steps in a row"
    assert slow.phase is RequestStatus.RUNNING and 10 <= slow.state.forward_calls < 512
    pages = engine.scheduler.pool.pages_in_use
    slow_pages = len(slow.kv.pages)
    engine.abort(slow)  # what a client disconnect does (RequestGroup.abort)
    engine.step()
    assert slow.phase is RequestStatus.ABORTED and slow.kv is None
    assert outs[4][-1].finish_reason == "abort"
    assert engine.scheduler.pool.pages_in_use <= pages - slow_pages  # its pages are free after this one step
    while not engine.scheduler.idle:
        engine.step()
    for i in range(4):
        assert outs[i][-1].finish_reason == "stop" and len(outs[i]) > 1  # streamed: more than one output
    assert engine.scheduler.pool.pages_in_use == 0


def test_request_deadline_ends_a_llada_request(llm):
    engine, _ = _engine(llm)
    streams, slow, outs = _mix(llm, engine, deadline=time.monotonic() + 1e9)
    for _ in range(5):
        engine.step()
    slow.deadline = time.monotonic() - 1  # request_timeout_s has run out
    engine.step()
    assert slow.phase is RequestStatus.ABORTED and outs[4][-1].finish_reason == "timeout" and slow.kv is None
    assert all(r.phase is RequestStatus.RUNNING for r in streams)
    engine.abort_all()
    engine.step()
    assert engine.scheduler.pool.pages_in_use == 0
