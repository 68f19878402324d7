"""`diffuserve serve`: build the config tree once, load the model, start the engine thread, run uvicorn.

Shutdown drains: on SIGTERM (or SIGINT) /ready turns 503 and new requests get 503 while the requests in flight
finish (up to `engine.drain_timeout_s`); then uvicorn stops and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import threading

import uvicorn

log = logging.getLogger("diffuserve.server")


def build_engine(cfg, llm, metrics):
    from engine.engine import AsyncEngine, Engine
    from engine.model.kv_pool import KVPool
    from engine.runner import ModelRunner
    from engine.scheduler import Limits, Scheduler

    e = cfg.engine
    pool = KVPool.for_model(llm.model, e.kv_cache_mb << 20)
    limits = Limits(max_running=e.max_running, max_waiting=e.max_waiting, max_rows_per_step=e.max_rows_per_step)
    engine = Engine(llm.model, Scheduler(limits, pool), ModelRunner(llm.model, pool), metrics, threads=e.threads)
    engine.start()
    return engine, AsyncEngine(engine)


def serve(args: argparse.Namespace) -> int:
    from engine.config import build_config
    from engine.llm import LLM
    from engine.metrics import Metrics

    from .routes import create_app

    cfg = build_config(args.config, model__path=args.model, model__dtype=args.dtype, model__device=args.device,
                       model__served_model_name=args.served_model_name, server__host=args.host,
                       server__port=args.port, server__api_key=args.api_key)
    llm = LLM(cfg.model.path, cfg.model.dtype, cfg.model.device)
    served = cfg.model.served_model_name or cfg.model.path.rstrip("/").split("/")[-1]
    metrics = Metrics(served)
    engine, front = build_engine(cfg, llm, metrics)
    server: DrainingServer | None = None
    app = create_app(cfg, llm, front, metrics, ready=lambda: server is not None and not server.draining)
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level="info",
                            timeout_graceful_shutdown=10)
    server = DrainingServer(config, engine, cfg.engine.drain_timeout_s)
    log.info("serving %s as %r on http://%s:%d", cfg.model.path, served, cfg.server.host, cfg.server.port)
    server.run()
    engine.stop()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before uvicorn's own graceful shutdown."""

    def __init__(self, config, engine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:  # second signal: stop now
            return super().handle_exit(sig, frame)
        self.draining = True
        self.engine.drain()
        log.info("draining: waiting up to %.0fs for in-flight requests", self.drain_timeout)
        threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True).start()

    def _drain_then_exit(self, sig, frame) -> None:
        if not self.engine.wait_idle(self.drain_timeout):
            log.warning("drain timeout: stopping with requests still in flight")
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its shutdown (the process would die of SIGTERM); a completed
        # drain is a clean exit, status 0.
        getattr(self, "_captured_signals", []).clear()
