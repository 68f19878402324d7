"""`diffuserve serve`: build the config tree once, listen, load and warm the model, start the engine thread.

Shutdown drains: on SIGTERM (or SIGINT) /ready turns 503 and new requests get 503 while the requests in flight
finish (up to `engine.drain_timeout_s`; those still running then end with finish_reason "abort"); then uvicorn
stops and the process exits 0. A second signal stops at once. Phases and probes: server/lifecycle.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import uvicorn

from .connection import with_request_ids
from .errors import Guard
from .lifecycle import Lifecycle, Stage, Swap, starting_app
from .protocol import model_card

log = logging.getLogger("diffuserve.server")


WARM_ROWS = 2048  # the engine builds the matmul kernels of every padded row count up to this at start (~0.7 s)


def build_engine(cfg, llm, metrics, threads: int | None = None, start: bool = True):
    from diffuserve.engine.engine import AsyncEngine, Engine
    from diffuserve.engine.model.kv_pool import KVPool
    from diffuserve.engine.runner import ModelRunner
    from diffuserve.engine.scheduler import Limits, Scheduler

    e = cfg.engine
    pool = KVPool.for_model(llm.model, e.kv_cache_mb << 20)
    limits = Limits(max_running=e.max_running, max_waiting=e.max_waiting, max_rows_per_step=e.max_rows_per_step,
                    max_running_per_body=e.max_running_per_body)
    # Row counts past WARM_ROWS are rare, and a kernel built then costs little beside that big a forward.
    engine = Engine(llm.model, Scheduler(limits, pool), ModelRunner(llm.model, pool), metrics,
                    threads=e.threads or threads, warm_rows=min(e.max_rows_per_step, WARM_ROWS),
                    batch_invariant=e.batch_invariant)
    if start:  # tests step it synchronously instead
        engine.start()
    return engine, AsyncEngine(engine)


def uvicorn_config(app, cfg, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings from the config tree: bind address, head size and time limits, keep-alive."""
    from .connection import deadline_protocol

    s = cfg.server
    return uvicorn.Config(app, host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=10,
                          http=deadline_protocol(s.head_timeout_s), h11_max_incomplete_event_size=s.max_header_bytes,
                          timeout_keep_alive=s.keep_alive_s)


def serve(args: argparse.Namespace) -> int:
    """Listen at once (probes see LOADING), load and warm the model in a thread, then serve; -> exit status."""
    from diffuserve.engine.config import build_config
    from diffuserve.tools.serve_flags import config_overrides

    cfg = build_config(args.config, **config_overrides(args))
    threads = _engine_threads()
    life = Lifecycle()
    # While loading, /v1/models already names the model (clients and load balancers probe it), behind the same
    # guard (API key, limits) as the real app; every response carries an x-request-id.
    swap = Swap(Guard(starting_app(life, _card(cfg)), cfg))
    server = DrainingServer(uvicorn_config(with_request_ids(swap), cfg), life, cfg.engine.drain_timeout_s)
    loader = threading.Thread(target=_load, args=(cfg, life, swap, threads), name="diffuserve-loader", daemon=True)
    loader.start()
    life.watch(server.die, stall_s=cfg.engine.stall_timeout_s)
    log.info("listening on http://%s:%d; loading %s", cfg.server.host, cfg.server.port, cfg.model.path)
    server.run()
    status = 1 if life.stage is Stage.DEAD else 0
    # Decided before the engine stops: the watchdog would otherwise see a stopped engine, call the server dead,
    # and turn a clean drain into exit 1 (a race the haproxy deploy test lost about one run in four).
    life.closed = True
    if life.engine is not None:
        life.engine.stop()
    if loader.is_alive() or (life.engine is not None and not life.engine.stopped):
        # Stopped while loading, or with the engine stuck in a step (stalled): that thread is inside torch, and
        # tearing the interpreter down under it can abort the process (SIGABRT from a C++ thread). Nothing is left
        # to save, so leave without the teardown.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
    return status


def _card(cfg) -> dict | None:
    """The /v1/models entry, from the checkpoint's config.json alone (None if that cannot be read: the loader will
    say why)."""
    from diffuserve.engine.model import load_spec

    try:
        return model_card(cfg.model.served, load_spec(cfg.model.path).max_positions)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no model card before loading: %s", exc)
        return None


def _engine_threads() -> int:
    """The torch threads the engine thread gets (torch's default: one per core); every other thread gets one.

    torch's CPU ops run on OpenMP, which keeps a team of worker threads per thread that starts parallel work. With
    a second team alive (the event loop's, say, after one parallel op), libgomp has more threads than cores and
    stops spinning between parallel regions; measured on 2 cores, every op of the engine thread then ran 2-6x
    slower (an elementwise op 26 -> 160 us, a 16-request step 16 -> 34 ms). Capping the other threads at one
    thread keeps a single team: the engine's."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread (the event loop) and the threads started after it
    return n


def _load(cfg, life: Lifecycle, swap: Swap, threads: int | None = None) -> None:
    from diffuserve.engine.llm import LLM
    from diffuserve.engine.metrics import Metrics

    from .routes import create_app

    try:
        t0 = time.monotonic()
        llm = LLM(cfg.model.path, cfg.model.dtype, cfg.model.device)
        served = cfg.model.served
        metrics = Metrics(served, cfg.server.metrics_prefix)
        engine, front = build_engine(cfg, llm, None, threads)  # no metrics yet: the warm-up is nobody's request
        life.engine = engine
        log.info("loaded %s in %.1fs; warming up", cfg.model.path, time.monotonic() - t0)
        life.to(Stage.WARMING)
        warm_up(engine, llm, cfg)
        engine.attach_metrics(metrics)
        swap.app = create_app(cfg, llm, front, metrics, ready=life.ready)
        if life.stage is Stage.WARMING:  # a signal may have come meanwhile
            life.to(Stage.READY)
        log.info("serving %s as %r (ready after %.1fs)", cfg.model.path, served, time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - any load failure leaves a dead server for the watchdog to end
        if life.stage is Stage.DRAINING:  # stopped during start-up (the warm-up was aborted): not a failure
            return
        log.exception("loading failed")
        life.to(Stage.DEAD, f"loading failed: {type(exc).__name__}: {exc}")


def warm_up(engine, llm, cfg, tokens: int = 4) -> None:
    """One short generation through the engine thread, so the first client does not pay for lazy set-up."""
    from diffuserve.engine.decoding import METHODS
    from diffuserve.engine.request import Request

    name = cfg.decoding.default_method(llm.spec.family)
    method = METHODS[name]
    base = cfg.decoding.options_for(method, name)
    # A configured block length must divide the short canvas.
    short = {k: tokens for k in ("steps", "block_length") if getattr(base, k, None) is not None}
    opts = base.with_(gen_length=tokens, **short)
    done = threading.Event()
    outs = []

    def sink(out):
        outs.append(out)
        if out.finished:
            done.set()

    prompt = [llm.spec.bos_id if llm.spec.bos_id is not None else llm.spec.eos_id]
    engine.submit(Request("warm-up", prompt, method, opts, 0, sink, llm.tokenizer, llm.spec.stop_ids,
                          llm.spec.mask_id))
    if not done.wait(300) or outs[-1].error is not None:
        raise RuntimeError(f"warm-up generation failed: {outs[-1].error if outs else 'no output'}")
    engine.wait_idle(60)  # retired too, before the caller attaches the metrics


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before uvicorn's own graceful shutdown."""

    def __init__(self, config, life: Lifecycle, drain_timeout: float):
        super().__init__(config)
        self.life, self.drain_timeout = life, drain_timeout
        self.draining = False

    def die(self) -> None:
        """The watchdog's exit: the server is dead, stop serving now."""
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if self.draining:  # second signal: stop now
            return super().handle_exit(sig, frame)
        self.draining = True
        starting = self.life.stage in (Stage.LOADING, Stage.WARMING)
        self.life.to(Stage.DRAINING)
        if starting:
            # No client request can be in flight before READY: stop now rather than wait for the warm-up, which
            # took ~60 s in a loaded container, past Docker's and k8s' 10-30 s kill.
            log.info("stopping during start-up: nothing to drain")
            if self.life.engine is not None:
                self.life.engine.abort_all("abort")
            return self._exit(sig, frame)
        if self.life.engine is not None:
            self.life.engine.drain()
        log.info("draining: waiting up to %.0fs for in-flight requests", self.drain_timeout)
        threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True).start()

    def _drain_then_exit(self, sig, frame) -> None:
        engine = self.life.engine
        if engine is not None and not engine.wait_idle(self.drain_timeout):
            n = engine.abort_all("abort")
            log.warning("drain timeout: aborted %d requests still in flight", n)
            engine.wait_idle(5.0)  # their last outputs (finish_reason "abort") reach the clients
            time.sleep(0.2)
        self._exit(sig, frame)

    def _exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its shutdown (the process would die of SIGTERM); a completed
        # drain is a clean exit, status 0.
        getattr(self, "_captured_signals", []).clear()
