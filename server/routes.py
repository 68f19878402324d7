"""HTTP routes: OpenAI-compatible endpoints over one loaded LLM.

Generation runs on a single worker thread, never on the event loop, so /health answers during a model step.
(This is the foundation's minimal server: one request at a time, no streaming; the scheduler with continuous
batching and SSE streaming replace `_run` without changing the routes' contract.)
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.config import SERVING_METHOD, Config
from engine.decoding import DecodeOptions
from engine.llm import LLM

from .protocol import ChatRequest, CompletionRequest, chat_body, completion_body, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _options(cfg: Config, req, max_tokens: int | None) -> DecodeOptions:
    changes = {k: v for k, v in {"gen_length": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                                 "steps": req.steps, "block_length": req.block_length, "threshold": req.threshold,
                                 "remasking": req.remasking, "alg": req.alg}.items() if v is not None}
    return cfg.decoding.options.with_(**changes)


def create_app(cfg: Config, llm: LLM) -> FastAPI:
    app = FastAPI(title="diffuserve", version="0.1.0")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffuserve-engine")
    served = cfg.model.served_model_name or cfg.model.path.rstrip("/").split("/")[-1]

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.server.max_body_bytes):
            return JSONResponse(error_body("request body too large"), status_code=413)
        if cfg.server.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), cfg.server.api_key.encode()):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error"), 401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid request')}", param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "not_found_error" if exc.status_code == 404 else
                                       "invalid_request_error"), status_code=exc.status_code)

    def _check_model(name: str | None) -> None:
        if name is not None and name != served:
            raise APIError(404, f"model {name!r} not found; this server serves {served!r}", "model")

    async def _run(ids: list[int], req, max_tokens: int | None):
        if req.stream:
            raise APIError(400, "stream=true is not supported by this server yet", "stream")
        opts = _options(cfg, req, max_tokens)
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        loop = asyncio.get_running_loop()
        try:
            method = req.method or cfg.decoding.method or SERVING_METHOD[llm.spec.family]
            return await loop.run_in_executor(pool, lambda: llm.generate(
                ids, method, opts, seed=req.seed or 0, stop=stops))
        except (ValueError, KeyError) as exc:
            raise APIError(400, str(exc).strip("'\"")) from None
        except Exception as exc:  # one request's failure ends that request only
            raise APIError(500, f"generation failed: {type(exc).__name__}", type_="server_error") from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "diffuserve"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else _encode(llm, prompt, chat=False)
        out = await _run(ids, req, req.max_tokens)
        c = out.completion
        return completion_body(served, c.text, c.finish_reason, len(ids), len(c.token_ids))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        _check_model(req.model)
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template", "messages")
        text = llm.tokenizer.apply_chat_template([m.model_dump() for m in req.messages],
                                                 add_generation_prompt=True, tokenize=False)
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = await _run(ids, req, req.max_completion_tokens or req.max_tokens)
        c = out.completion
        return chat_body(served, c.text, c.finish_reason, len(ids), len(c.token_ids))

    return app


def _encode(llm: LLM, text: str, chat: bool) -> list[int]:
    try:
        return llm.encode(text, chat=chat)
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from None
