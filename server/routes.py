"""HTTP routes: the OpenAI-compatible endpoints, over the engine's async front.

A POST body is parsed (protocol), checked against the loaded model's limits, turned into one engine `Request` per
prompt and choice, and submitted as a group; the response is then either collected (`Job.body`) or streamed as SSE
(`sse.events`). Before answering 200 the route waits for the group's first output, so an option the method rejects
still gets a proper 400 even when streaming. Client disconnects abort the group at the next engine step.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from diffuserve.engine.canvas import CanvasView
from diffuserve.engine.config import Config
from diffuserve.engine.decoding import METHODS, DecodeOptions
from diffuserve.engine.decoding.score import SCORE, ScoreOptions
from diffuserve.engine.engine import AsyncEngine
from diffuserve.engine.llm import LLM
from diffuserve.engine.request import Request as EngineRequest
from diffuserve.engine.scheduler import Draining, QueueFull

from . import openapi, playground
from .errors import APIError, install
from .prompts import Prompts
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, model_card, new_id
from .sse import Choice, Job, error_of, events

# Body fields that are decoding options; each goes to the method's own options, and one the method does not
# declare is a 400 naming it. OpenAI's own sampling fields at their no-op value are accepted by every method.
OPTION_FIELDS = ("temperature", "top_p", "top_k", "steps", "block_length", "threshold", "remasking", "alg",
                 "window_tokens", "active_tokens", "refresh_cycle", "refresh", "eos_early_exit", "early_stop")
NO_OP = {"top_p": (1.0,), "top_k": (-1, 0)}  # OpenAI's and vLLM's "off": dropped, whatever the method


class Routes:
    """The endpoints' shared state: config, model, engine front, metrics."""

    def __init__(self, cfg: Config, llm: LLM, front: AsyncEngine, metrics, ready):
        self.cfg, self.llm, self.front, self.metrics, self.ready = cfg, llm, front, metrics, ready
        self.served = cfg.model.served
        self.prompts = Prompts(llm, cfg.server.max_prompts)

    # -- validation ----------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served:
            raise APIError(404, f"model {name!r} not found; this server serves {self.served!r}", "model",
                           "not_found_error", code="model_not_found")

    def method(self, req):
        name = req.method or self.cfg.decoding.default_method(self.llm.spec.family)
        m = METHODS.get(name)
        if m is None:
            raise APIError(400, f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}", "method")
        if not m.decodes(self.llm.spec.family):
            raise APIError(400, f"method {name!r} decodes {m.family} models, this one is {self.llm.spec.family}",
                           "method")
        return m

    @staticmethod
    def check_logprobs(wanted: bool, method) -> None:
        # Only some methods record the committed tokens' log-probabilities (DecodeState.records_logprobs).
        if wanted and not method.state.records_logprobs:
            raise APIError(400, f"logprobs are not available with method {method.name!r}; use 'window'", "logprobs")

    def options(self, req, max_tokens: int | None, longest_prompt: int, method) -> DecodeOptions:
        base = self.cfg.decoding.options_for(method, self.cfg.decoding.default_method(self.llm.spec.family))
        gen = max_tokens or base.gen_length
        self.check_context(longest_prompt, gen)
        declared = method.options.field_names()
        changes = {k: getattr(req, k) for k in OPTION_FIELDS
                   if getattr(req, k) is not None and getattr(req, k) not in NO_OP.get(k, ())}
        for k in sorted(changes.keys() - declared):
            raise APIError(400, f"method {method.name!r} has no option {k!r}; its options: "
                                f"{', '.join(sorted(declared & set(OPTION_FIELDS)))}", k)
        if req.min_tokens > gen:
            raise APIError(400, f"min_tokens ({req.min_tokens}) cannot exceed max_tokens ({gen})", "min_tokens")
        if changes.get("steps", 0) > gen:
            raise APIError(400, f"steps ({changes['steps']}) cannot exceed max_tokens ({gen})", "steps")
        opts = base.with_(gen_length=gen, **changes)
        if method.validate is not None:
            try:
                method.validate(opts)
            except ValueError as exc:
                raise APIError(400, str(exc)) from None
        return opts

    def check_context(self, longest_prompt: int, gen: int) -> None:
        limit = self.llm.spec.max_positions
        if longest_prompt + gen <= limit:
            return
        if longest_prompt >= limit:
            raise APIError(400, f"the prompt has {longest_prompt} tokens; this model's context is {limit}", "prompt",
                           code="context_length_exceeded")
        raise APIError(400, f"prompt ({longest_prompt} tokens) + max_tokens ({gen}) exceeds this model's context of "
                            f"{limit} tokens", "max_tokens", code="context_length_exceeded")

    def score_options(self, req, longest_prompt: int) -> ScoreOptions:
        """Echo + logprobs: score the prompt (decoding.score), then generate max_tokens (0 or 1) tokens."""
        if req.stream:
            raise APIError(400, "prompt scoring (echo with logprobs) is not streamed", "stream")
        gen = 1 if req.max_tokens is None else req.max_tokens
        if gen > 1:
            raise APIError(400, "echo with logprobs scores the prompt (its tokens' shares of the diffusion ELBO) and "
                                "generates at most 1 token: ask for the completion separately", "max_tokens")
        self.check_context(longest_prompt, gen)
        if req.method not in (None, "score"):
            raise APIError(400, "echo with logprobs scores the prompt with method 'score'", "method")
        changes = {k: v for k, v in (("mc_samples", req.mc_samples), ("score_from", req.score_from)) if v is not None}
        opts = SCORE.make_options({"gen_length": gen, "temperature": req.temperature or 0.0, **changes})
        try:
            SCORE.validate(opts)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return opts

    def common(self, req) -> None:
        s = self.cfg.server
        if req.n > s.max_n:
            raise APIError(400, f"n must be at most {s.max_n}", "n")
        if len(req.stops()) > s.max_stop:
            raise APIError(400, f"at most {s.max_stop} stop sequences are allowed", "stop")
        if any(not isinstance(x, str) or not x for x in req.stops()):
            raise APIError(400, "stop sequences must be non-empty strings", "stop")

    # -- running a job ---------------------------------------------------------------------------------------------
    def submit(self, req, prompts: list[list[int]], opts: DecodeOptions, method, rid: str, top: int = 0):
        llm, timeout = self.llm, self.cfg.engine.request_timeout_s
        view = req.stream_options.include_canvas if req.stream_options else False
        if view and not req.stream:
            raise APIError(400, "stream_options.include_canvas needs stream: true", "stream_options")
        e = self.cfg.engine
        if len(prompts) * req.n > e.max_running + e.max_waiting:  # could never be held at once: retrying is futile
            raise APIError(400, f"prompts x n = {len(prompts) * req.n} choices; this server holds at most "
                                f"{e.max_running + e.max_waiting} requests at once", "n")
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        makers = []
        for p, ids in enumerate(prompts):
            for k in range(req.n):
                i = p * req.n + k

                def make(sink, ids=ids, i=i):
                    return EngineRequest(f"{rid}-{i}", ids, method, opts, (base_seed + i) % 2**63, sink,
                                         llm.tokenizer, llm.spec.stop_ids, llm.spec.mask_id, req.stops(),
                                         deadline=time.monotonic() + timeout, top_logprobs=top,
                                         min_tokens=opts.gen_length if req.ignore_eos else req.min_tokens,
                                         group=rid, canvas_view=CanvasView(view == "full") if view else None)
                makers.append(make)
        try:
            return self.front.submit(makers)
        except QueueFull as exc:
            self.metrics.on_rejected()
            raise APIError(429, f"server busy: {exc}; retry later", type_="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except Draining as exc:
            self.metrics.on_rejected()
            raise APIError(503, str(exc), type_="server_error", headers={"Retry-After": "5"}) from None
        except ValueError as exc:
            raise APIError(400, str(exc), "max_tokens") from None

    async def respond(self, http: Request, job: Job, group, stream: bool):
        it = group.__aiter__()
        try:
            first = await _next_or_disconnect(http, it)
        except BaseException:
            await it.aclose()
            raise
        if first is None:  # the client left before anything came out
            await it.aclose()
            return Response(status_code=499)
        i, out = first
        if out.error is not None or out.finish_reason in ("abort", "timeout"):
            await it.aclose()
            status, body = error_of(out)
            return JSONResponse(body, status_code=status)
        if stream:
            return StreamingResponse(events(job, it, [first]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        job.absorb(i, out)
        while True:
            item = await _next_or_disconnect(http, it)
            if item is None:
                break
            job.absorb(*item)
        await it.aclose()
        err = job.first_error()
        if err is not None:
            status, body = error_of(err)
            return JSONResponse(body, status_code=status)
        if any(c.finish_reason is None for c in job.choices):  # the client left
            return Response(status_code=499)
        return JSONResponse(job.body())

    def token_text(self, ids: list[int]) -> list[str]:
        tok = self.llm.tokenizer
        return [tok.decode([t], skip_special_tokens=False) if tok is not None else str(t) for t in ids]


async def _next_or_disconnect(http: Request, it):
    """The group's next output, or None once the iteration ends or the client disconnects (checked every 0.1 s)."""
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=0.1)
            if done:
                try:
                    return nxt.result()
                except StopAsyncIteration:
                    return None
            if await http.is_disconnected():
                return None
    finally:
        if not nxt.done():
            nxt.cancel()
            # Wait for the cancelled __anext__ to unwind: closing the generator while it still runs raised
            # "aclose(): asynchronous generator is already running" (a 500 and a traceback per early disconnect).
            await asyncio.wait({nxt})


def create_app(cfg: Config, llm: LLM, front: AsyncEngine, metrics, ready) -> FastAPI:
    """ready(): "ready" (or True) while the model is loaded and warm and the server is not draining."""
    docs = {} if cfg.server.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="diffuserve", version="0.1.0", **docs)
    r = Routes(cfg, llm, front, metrics, ready)
    install(app, cfg)
    _probes(app, r)
    _tokenizer_routes(app, r)
    playground.install(app, r, OPTION_FIELDS)

    @app.post("/v1/completions", responses=openapi.COMPLETIONS)
    async def completions(req: CompletionRequest, http: Request):
        r.check_model(req.model)
        r.common(req)
        prompts = await r.prompts.completion(req.prompt)
        scoring = req.echo and req.logprobs is not None  # the prompt's log-probabilities: decoding.score
        if scoring:
            method, opts = SCORE, r.score_options(req, max(map(len, prompts)))
        else:
            if req.max_tokens == 0:
                raise APIError(400, "max_tokens 0 is only for scoring a prompt (echo with logprobs)", "max_tokens")
            method = r.method(req)
            r.check_logprobs(req.logprobs is not None, method)
            opts = r.options(req, req.max_tokens or 16, max(map(len, prompts)), method)
        rid = new_id("cmpl")
        choices = []
        for ids in prompts:
            prefix = llm.tokenizer.decode(ids, skip_special_tokens=True) if req.echo and llm.tokenizer else ""
            toks = r.token_text(ids) if scoring else []
            choices += [Choice(len(choices) + k, prefix=prefix, prompt_tokens=toks) for k in range(req.n)]
        job = Job(rid, r.served, False, choices, sum(map(len, prompts)), r.token_text, req.logprobs is not None,
                  bool(req.stream and req.stream_options and req.stream_options.include_usage))
        return await r.respond(http, job, r.submit(req, prompts, opts, method, rid, req.logprobs or 0), req.stream)

    @app.post("/v1/chat/completions", responses=openapi.CHAT)
    async def chat(req: ChatRequest, http: Request):
        r.check_model(req.model)
        r.common(req)
        ids = await r.prompts.chat(req.messages)
        method = r.method(req)
        if req.max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", "max_tokens")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        r.check_logprobs(req.logprobs, method)
        opts = r.options(req, req.max_completion_tokens or req.max_tokens, len(ids), method)
        rid = new_id("chatcmpl")
        job = Job(rid, r.served, True, [Choice(k) for k in range(req.n)], len(ids), r.token_text, req.logprobs,
                  bool(req.stream and req.stream_options and req.stream_options.include_usage))
        return await r.respond(http, job, r.submit(req, [ids], opts, method, rid, req.top_logprobs or 0),
                               req.stream)

    return app


def _probes(app: FastAPI, r: Routes) -> None:
    """Liveness, readiness, metrics and the model list."""
    llm, metrics, ready = r.llm, r.metrics, r.ready

    @app.get("/health", responses=openapi.HEALTH)
    async def health():
        if not r.front.engine.alive:  # the process is up but can generate nothing: let the orchestrator restart it
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        stalled = r.front.engine.stalled_for()
        if stalled > r.cfg.engine.stall_timeout_s:  # work is waiting and no step ends: as good as stopped
            return JSONResponse({"status": f"engine stalled: no step finished for {stalled:.0f}s"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", responses=openapi.READY)
    async def readiness():
        state = ready()  # "ready" (or True), else what the server is doing instead ("draining", "dead", ...)
        if state is not True and state != "ready":
            return JSONResponse({"status": state or "not ready"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> dict:
        return model_card(r.served, llm.spec.max_positions)

    @app.get("/v1/models", responses=openapi.MODELS)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", responses=openapi.MODEL)
    async def model(model_id: str):
        r.check_model(model_id)
        return card()


def _tokenizer_routes(app: FastAPI, r: Routes) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info (what lm-evaluation-harness's remote tokenizer asks), with
    the same request and response shapes; they need the API key like the /v1/ routes."""
    llm, tokenizer = r.llm, r.prompts.tokenizer

    @app.post("/tokenize", responses=openapi.TOKENIZE)
    async def tokenize(req: TokenizeRequest):
        r.check_model(req.model)
        tokenizer()
        chat = req.messages if req.messages is not None else (req.prompt if isinstance(req.prompt, list) else None)
        if chat is not None:
            if not chat:
                raise APIError(400, "messages must not be empty", "prompt")
            ids = await r.prompts.chat(chat, req.add_generation_prompt, generating=False)
        else:
            ids = await r.prompts.text(req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
        return {"count": len(ids), "max_model_len": llm.spec.max_positions, "tokens": ids,
                "token_strs": r.token_text(ids) if req.return_token_strs else None}

    @app.post("/detokenize", responses=openapi.DETOKENIZE)
    async def detokenize(req: DetokenizeRequest):
        r.check_model(req.model)
        tok = tokenizer()
        if any(not 0 <= t < llm.spec.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {llm.spec.vocab_size})", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.get("/tokenizer_info", responses=openapi.TOKENIZER_INFO)
    async def tokenizer_info():
        tok = tokenizer()
        info = {"tokenizer_class": type(tok).__name__, "model_max_length": llm.spec.max_positions,
                "vocab_size": llm.spec.vocab_size, "chat_template": getattr(tok, "chat_template", None)}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
            value = getattr(tok, name, None)
            info[name] = None if value is None else str(value)
        return info
