"""Errors as OpenAI shapes them, everywhere: `{"error": {"message", "type", "param", "code"}}`.

`Guard` is a plain ASGI middleware (so streaming and disconnect detection pass through it untouched) that refuses a
body over the limit before any of it is parsed (413: from Content-Length, or while a chunked body arrives) and
checks the API key of /v1/ routes in constant time (401).
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.config import Config

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


class Guard:
    def __init__(self, app, cfg: Config):
        self.app, self.limit, self.key = app, cfg.server.max_body_bytes, cfg.server.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, error_body("request body too large", code="body_too_large"))
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if scope["method"] == "POST" and ctype not in ("application/json", "") and not ctype.endswith("+json"):
            return await _send_json(send, 415, error_body(f"Content-Type must be application/json, not {ctype!r}",
                                                          code="unsupported_media_type"))
        if self.key and scope["path"].startswith("/v1/"):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                return await _send_json(send, 401, error_body("invalid or missing API key", "authentication_error",
                                                              code="invalid_api_key"))
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
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


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    msg = str(first.get("msg", "invalid request"))
    if "unsupported:" in msg:  # protocol.UNHONOURED: a field we cannot honour
        name = msg.split("unsupported:", 1)[1].split()[0].strip("'\"")
        return f"{name}: this server cannot honour this field's value", name
    loc = [str(p) for p in first.get("loc", [])[1:] if not str(p).startswith(("function-", "list[", "str", "int"))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if first.get("type") == "missing" and param:
        return f"{param}: field required", param
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI, cfg: Config) -> None:
    app.add_middleware(Guard, cfg=cfg)

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
        code = "body_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), kind, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
