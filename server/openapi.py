"""What /openapi.json says each route answers: the success bodies and every error status, so a client (or a schema
fuzzer, tests/reliability/test_schema_fuzz.py) can hold the server to it.

These models only document: the routes build their bodies as plain dicts (protocol.py, sse.py) and nothing here
validates them at run time. Every error, whoever raises it (the Guard middleware, a validation failure, a route),
has OpenAI's shape, `ErrorResponse`. A malformed body is a 400, never FastAPI's default 422: declaring "4XX" (any
other client error, same shape) is what keeps FastAPI from adding its own 422 and HTTPValidationError schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object, the body of every 4xx and 5xx."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- streamed chunks: each SSE event's `data` is one of these as JSON, an ErrorResponse, or the final `[DONE]` --
class CompletionChunkChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None  # present (null until the last chunk) with stream_options.include_usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(ge=1)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Status(BaseModel):
    status: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    mask_token: str | None


# -- the `responses=` of each route --------------------------------------------------------------------------------
def _error(description: str, retry_after: bool = False) -> dict:
    out: dict = {"model": ErrorResponse, "description": description}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer", "minimum": 0}}}
    return out


def _stream(chunk: type[BaseModel]) -> dict:
    """The 200 of a body with "stream": true: Server-Sent Events, one JSON chunk per event, then `data: [DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json",
            "description": f"a {chunk.__name__} as JSON, an ErrorResponse (a failure after the stream began), or, "
                           "last, [DONE]"}
    # One event's schema, as FastAPI writes it for its own SSE routes (Open API 3.2's itemSchema).
    return {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer", "minimum": 0}}}}}


# The Guard middleware's answers, before any route runs (server/errors.py).
_ANY_ROUTE = {
    413: _error("request body too large (server.max_body_bytes)"),
    431: _error("request headers too large (server.max_header_bytes)"),
    "4XX": _error("any other client error (e.g. 405 for a method the path does not serve); same error shape"),
}
_API_KEY = {401: _error("invalid or missing API key (only when server.api_key is set)")}
_BODY = {
    400: _error("invalid request: a malformed body, a value outside its range, an option the decoding method "
                "rejects, or a request beyond a configured limit (n, prompts, stop strings, context length)"),
    408: _error("the request body did not arrive in time (server.body_timeout_s)"),
    415: _error("Content-Type is not application/json"),
}
_GENERATION = {
    404: _error("the model named in the body is not the one this server serves"),
    429: _error("the queue is full (engine.max_waiting); retry later", retry_after=True),
    499: {"description": "the client closed the connection before the response (logged; no body is sent)"},
    500: _error("the generation failed"),
    503: _error("the server is draining, or the request was aborted", retry_after=True),
    504: _error("the request did not finish before its deadline (engine.request_timeout_s)"),
}

COMPLETIONS = {200: {"model": CompletionResponse, "description": "the completion, or an event stream with stream",
                     "content": _stream(CompletionChunk)},
               **_BODY, **_GENERATION, **_API_KEY, **_ANY_ROUTE}
CHAT = {200: {"model": ChatCompletionResponse, "description": "the chat completion, or an event stream with stream",
              "content": _stream(ChatCompletionChunk)},
        **_BODY, **_GENERATION, **_API_KEY, **_ANY_ROUTE}
MODELS = {200: {"model": ModelList, "description": "the one model this server serves"}, **_API_KEY, **_ANY_ROUTE}
MODEL = {200: {"model": ModelCard, "description": "the served model"},
         404: _error("no such model"), **_API_KEY, **_ANY_ROUTE}
_NO_TOKENIZER = {400: _error("the model has no tokenizer files, or the input cannot be tokenized")}
TOKENIZE = {200: {"model": TokenizeResponse, "description": "the prompt's (or rendered messages') token ids"},
            **_BODY, **_NO_TOKENIZER, 404: _error("no such model"), **_API_KEY, **_ANY_ROUTE}
DETOKENIZE = {200: {"model": DetokenizeResponse, "description": "the text of the token ids"},
              **_BODY, **_NO_TOKENIZER, 404: _error("no such model"), **_API_KEY, **_ANY_ROUTE}
TOKENIZER_INFO = {200: {"model": TokenizerInfo, "description": "the tokenizer's class, special tokens, chat template"},
                  **_NO_TOKENIZER, **_API_KEY, **_ANY_ROUTE}
HEALTH = {200: {"model": Status, "description": "the process is up and its engine loop runs"},
          503: {"model": Status, "description": "the engine loop stopped: restart the process"}, **_ANY_ROUTE}
READY = {200: {"model": Status, "description": "ready for requests"},
         503: {"model": Status, "description": "draining (or not yet ready): send requests elsewhere"}, **_ANY_ROUTE}


def _as_json(responses: dict) -> dict:
    """The same responses with their models as explicit JSON references: a route whose own media type is not JSON
    (FastAPI files a response `model` under the route's media type)."""
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/" + ErrorResponse.__name__}}}
    return {k: {**{n: v for n, v in r.items() if n != "model"}, "content": ref} for k, r in responses.items()}


# with response_class=PlainTextResponse (the 200 is text/plain; ErrorResponse is registered by the other routes)
METRICS = {200: {"description": "Prometheus text exposition format"}, **_as_json(_ANY_ROUTE)}
