"""Fixtures of the reliability suite: the real app and engine loop over a FakeRunner (no model weights), served by
uvicorn in this process on a free loopback port, with the same uvicorn settings `diffuserve serve` uses.

`fake_server(**overrides)` takes config overrides as `section__key=value` (e.g. `engine__max_running=2`) and runner
settings (`delay`, `fault_token`, `fault_after`, `length`); it yields a `Stack` whose pool, scheduler, engine, runner
and metrics tests inspect. Session-end: every FIGURE line again in the terminal summary, and, when
DIFFUSERVE_FIGURES names a file, the figures as JSON there (bench.reliability writes docs/reliability.md from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from .ledger import FIGURES

_LLM = {}


def tiny_text():
    """tiny-text's tokenizer and spec, loaded once (the fake runner never runs its weights)."""
    if "llm" not in _LLM:
        from diffuserve.engine.llm import LLM

        _LLM["llm"] = LLM("tiny-text")
    return _LLM["llm"]


SCRIPT_TEXT = " the king is dead and long live the queen"


@dataclass
class Stack:
    base: str
    cfg: object
    llm: object
    engine: object
    runner: object
    pool: object
    metrics: object
    server: object

    @property
    def scheduler(self):
        return self.engine.scheduler

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until the engine holds no request and no KV page (or the timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.engine.scheduler.idle and self.pool.pages_in_use == 0:
                return True
            time.sleep(0.02)
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_server(delay: float = 0.005, fault_token: int | None = None, fault_after: int = 0, length: int = 40,
                **overrides):
    from diffuserve.engine.config import build_config
    from diffuserve.engine.engine import AsyncEngine, Engine
    from fake_runner import FakeModel, FakeRunner
    from diffuserve.engine.metrics import Metrics
    from diffuserve.engine.model.kv_pool import KVPool
    from diffuserve.engine.scheduler import Limits, Scheduler
    from diffuserve.server.routes import create_app

    llm = tiny_text()
    words = llm.encode(SCRIPT_TEXT)
    runner = FakeRunner(llm.spec, lambda prompt: (words * (length // len(words) + 1))[:length], delay=delay,
                        fault_token=fault_token, fault_after=fault_after)
    cfg = build_config(None, model__path="tiny-text", server__port=free_port(), **overrides)
    e = cfg.engine
    pool = KVPool(1, 1, 1, 4096, 16, llm.model.dtype)
    limits = Limits(max_running=e.max_running, max_waiting=e.max_waiting, max_rows_per_step=e.max_rows_per_step,
                    max_running_per_body=e.max_running_per_body)
    metrics = Metrics("tiny-text")
    engine = Engine(FakeModel(llm.spec), Scheduler(limits, pool), runner, metrics)
    engine.start()
    app = create_app(cfg, llm, AsyncEngine(engine), metrics, ready=lambda: not engine.scheduler.draining)
    with serving(app, cfg, engine) as srv:
        yield Stack(f"http://127.0.0.1:{cfg.server.port}", cfg, llm, engine, runner, pool, metrics, srv)


@contextlib.contextmanager
def serving(app, cfg, engine):
    """uvicorn serving `app` in a thread, with `diffuserve serve`'s settings; stops it and the engine after."""
    import uvicorn

    from diffuserve.server.app import uvicorn_config

    srv = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield srv
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        engine.stop()


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for f in FIGURES:
        terminalreporter.write_line("FIGURE " + " ".join(f"{k}={v}" for k, v in f.items()))
    path = os.environ.get("DIFFUSERVE_FIGURES")
    if path:
        with open(path, "w") as fh:
            json.dump(FIGURES, fh, indent=1)


@pytest.fixture(scope="module")
def stack():
    """A default fake server shared by a module's tests."""
    with fake_server() as s:
        yield s


def scrape(base: str) -> list[tuple[str, dict, float]]:
    """Every sample of GET /metrics as (name, labels, value), parsed with prometheus_client's own parser."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(samples: list[tuple[str, dict, float]], name: str, **labels) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0.0 if none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))
