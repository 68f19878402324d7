"""Errors as OpenAI shapes them, everywhere: `{"error": {"message", "type", "param", "code"}}`.

`Guard` is a plain ASGI middleware (so streaming and disconnect detection pass through it untouched) that refuses a
body over the limit before any of it is parsed (413: from Content-Length, or while a chunked body arrives), ends a
body that arrives too slowly (408), and checks the API key of /v1/ routes in constant time (401).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffuserve.engine.config import Config

log = logging.getLogger("diffuserve.server")

from .protocol import error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers


class _BodyTooLarge(StarletteHTTPException):
    """Raised while a chunked body arrives. An HTTPException, so FastAPI's body reader passes it on as itself
    (it turns other exceptions into a 400)."""

    def __init__(self):
        super().__init__(413, "request body too large")


class _BodyTooSlow(StarletteHTTPException):
    def __init__(self):
        super().__init__(408, "the request body did not arrive in time")


TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


def protected(path: str) -> bool:
    """The routes an API key guards: the OpenAI API and the tokenizer (probes, metrics and docs stay open)."""
    return path.startswith("/v1/") or path in TOKENIZER_ROUTES


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Guard:
    def __init__(self, app, cfg: Config):
        s = cfg.server
        self.app, self.limit, self.body_timeout = app, s.max_body_bytes, s.body_timeout_s
        self.head_limit = s.max_header_bytes
        # Fixed-length digests, so compare_digest's time does not depend on the key's length either.
        self.keys = [_digest(k.strip()) for k in (s.api_key or "").split(",") if k.strip()]

    def authorized(self, auth: str) -> bool:
        given = _digest(auth[7:].strip() if auth[:7].lower() == "bearer " else "")
        ok = False
        for key in self.keys:  # every key is compared, whichever matches
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # h11 refuses a head that arrives incomplete beyond the limit (400); one that arrived whole in one read can
        # still be up to a read's size, so measure it here too.
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.head_limit:
            return await _send_json(send, 431, error_body("request headers too large", code="headers_too_large"),
                                    close=True)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, error_body("request body too large", code="body_too_large"))
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if scope["method"] == "POST" and ctype not in ("application/json", "") and not ctype.endswith("+json"):
            return await _send_json(send, 415, error_body(f"Content-Type must be application/json, not {ctype!r}",
                                                          code="unsupported_media_type"))
        if self.keys and protected(scope["path"]) and not self.authorized(headers.get("authorization", "")):
            return await _send_json(send, 401, error_body("invalid or missing API key", "authentication_error",
                                                          code="invalid_api_key"))
        seen, started, complete = 0, False, False
        body_deadline = time.monotonic() + self.body_timeout

        async def counted_receive():
            nonlocal seen, complete
            if complete:  # after the body only http.disconnect comes: no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _BodyTooSlow from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                complete = not msg.get("more_body", False)
                if seen > self.limit:
                    raise _BodyTooLarge
            return msg

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, error_body("request body too large", code="body_too_large"))
        except _BodyTooSlow:
            if not started:
                await _send_json(send, 408, error_body("the request body did not arrive in time", "timeout_error",
                                                       code="body_timeout"), close=True)
        except Exception as exc:  # noqa: BLE001 - a bug is this request's 500, never the connection's or server's
            # Answered here, not re-raised: Starlette's outer error middleware would send its 500 and re-raise, and
            # uvicorn would then drop the kept-alive connection under the client's next request.
            log.exception("request failed: %s %s", scope["method"], scope["path"])
            if not started:
                await _send_json(send, 500, error_body(f"internal error: {type(exc).__name__}", "server_error"))


async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the rest of the body may still be on its way: do not keep the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


def _is_tag(part: str) -> bool:
    """pydantic puts union members' type tags in an error's location (`str`, `list[int]`, `function-after[...]`);
    they are not field names."""
    return part in _TAGS or "[" in part


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    msg = str(first.get("msg", "invalid request"))
    if "unsupported:" in msg:  # protocol.UNHONOURED: a field we cannot honour
        name = msg.split("unsupported:", 1)[1].split()[0].strip("'\"")
        return f"{name}: this server cannot honour this field's value", name
    loc = [str(p) for p in first.get("loc", [])[1:] if not _is_tag(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if first.get("type") == "missing" and param:
        return f"{param}: field required", param
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI, cfg: Config) -> None:
    app.add_middleware(Guard, cfg=cfg)
    if cfg.server.cors_origins:  # outside Guard: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.server.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        code = {413: "body_too_large", 408: "body_timeout"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), kind, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
