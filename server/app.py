"""`diffuserve serve`: build the config tree once, load the model, run uvicorn."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("diffuserve.server")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.config import build_config
    from engine.llm import LLM

    from .routes import create_app

    cfg = build_config(args.config, model__path=args.model, model__dtype=args.dtype, model__device=args.device,
                       model__served_model_name=args.served_model_name, server__host=args.host,
                       server__port=args.port, server__api_key=args.api_key)
    llm = LLM(cfg.model.path, cfg.model.dtype, cfg.model.device)
    app = create_app(cfg, llm)
    log.info("serving %s on http://%s:%d", cfg.model.path, cfg.server.host, cfg.server.port)
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level="info")
    return 0
