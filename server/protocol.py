"""OpenAI wire format: request and response bodies of /v1/completions, /v1/chat/completions and /v1/models.

Unknown request fields are ignored, as OpenAI does. Diffusion-specific knobs (method, steps, block_length,
threshold, ...) are accepted as extra top-level fields and validated against DecodeOptions.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DiffusionFields(BaseModel):
    """Diffusion extensions shared by both endpoints (None = the server's configured default)."""

    model_config = ConfigDict(extra="ignore")

    method: str | None = None
    steps: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0, le=1)
    remasking: str | None = None
    alg: str | None = None


class SamplingFields(DiffusionFields):
    """The OpenAI fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
