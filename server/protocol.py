"""OpenAI wire format: request and response bodies of /v1/completions, /v1/chat/completions and /v1/models.

Unknown request fields are ignored, as OpenAI does, except the ones we cannot honour (`UNHONOURED`): those get a
400 that names the field rather than a silently different answer. Diffusion-specific knobs (method, steps,
block_length, threshold, window sizes, ...) are accepted as extra top-level fields; each is an option of the
methods that declare it (decoding.options), and one the chosen method does not read is a 400 naming it (routes).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# field -> the values we can honour (anything else is a 400 naming the field)
UNHONOURED = {
    "suffix": lambda v: v in (None, ""),
    "best_of": lambda v: v in (None, 1),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    # Code-like or tensor input from the client is never run or deserialised (RELIABILITY.md B.3): the chat
    # template is the model's own, and there is no constrained decoding or embedding input.
    "chat_template": lambda v: v is None,
    "chat_template_kwargs": lambda v: not v,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "prompt_embeds": lambda v: v is None,
    # vLLM's sampling extensions that no method here reads: a client sending them expects a different answer.
    "min_p": lambda v: v in (None, 0, 0.0),
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "use_beam_search": lambda v: v in (None, False),
    "stop_token_ids": lambda v: not v,
    "bad_words": lambda v: not v,
    "allowed_token_ids": lambda v: v is None,
    "include_stop_str_in_output": lambda v: v in (None, False),
    "skip_special_tokens": lambda v: v in (None, True),
    "truncate_prompt_tokens": lambda v: v is None,
    "prompt_logprobs": lambda v: v is None,
}


_NULL = {"type": "null"}
# What /openapi.json says each UNHONOURED field may be (the values we honour), so that the document is honest:
# a generator following it never meets the 400 these fields get otherwise.
HONOURED_SCHEMA = {
    "suffix": {"anyOf": [_NULL, {"const": ""}]},
    "best_of": {"anyOf": [_NULL, {"const": 1}]},
    "logit_bias": {"anyOf": [_NULL, {"type": "object", "maxProperties": 0}]},
    "presence_penalty": {"anyOf": [_NULL, {"const": 0}]},
    "frequency_penalty": {"anyOf": [_NULL, {"const": 0}]},
    "tools": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]},
    "functions": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]},
    "tool_choice": {"anyOf": [_NULL, {"const": "none"}]},
    "response_format": {"anyOf": [_NULL, {"type": "object", "properties": {"type": {"const": "text"}},
                                          "required": ["type"]}]},
    "audio": _NULL,
    "modalities": {"anyOf": [_NULL, {"const": ["text"]}]},
    "prediction": _NULL,
    "chat_template": _NULL,
    "chat_template_kwargs": {"anyOf": [_NULL, {"type": "object", "maxProperties": 0}]},
    "guided_json": _NULL,
    "guided_regex": _NULL,
    "guided_grammar": _NULL,
    "guided_choice": _NULL,
    "prompt_embeds": _NULL,
    "min_p": {"anyOf": [_NULL, {"const": 0}]},
    "repetition_penalty": {"anyOf": [_NULL, {"const": 1}]},
    "length_penalty": {"anyOf": [_NULL, {"const": 1}]},
    "use_beam_search": {"anyOf": [_NULL, {"const": False}]},
    "stop_token_ids": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]},
    "bad_words": {"anyOf": [_NULL, {"type": "array", "maxItems": 0}]},
    "allowed_token_ids": _NULL,
    "include_stop_str_in_output": {"anyOf": [_NULL, {"const": False}]},
    "skip_special_tokens": {"anyOf": [_NULL, {"const": True}]},
    "truncate_prompt_tokens": _NULL,
    "prompt_logprobs": _NULL,
}
assert set(HONOURED_SCHEMA) == set(UNHONOURED)


def _declare_unhonoured(schema: dict, model) -> None:
    for name, sub in HONOURED_SCHEMA.items():
        schema.setdefault("properties", {})[name] = {**sub, "description": "only this value is honoured; any "
                                                     "other is a 400 naming the field"}


class DiffusionFields(BaseModel):
    """Diffusion extensions shared by both endpoints (None = the server's configured default)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_declare_unhonoured)

    method: str | None = None
    steps: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0, le=1)
    remasking: Literal["low_confidence", "random"] | None = None
    alg: str | None = None
    window_tokens: int | None = Field(default=None, ge=1)
    active_tokens: int | None = Field(default=None, ge=1)
    refresh_cycle: int | None = Field(default=None, ge=1)
    refresh: Literal["full", "window", "buffer"] | None = None
    eos_early_exit: bool | None = None
    early_stop: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _honourable(cls, data):
        if isinstance(data, dict):
            for name, ok in UNHONOURED.items():
                if name in data and not ok(data[name]):
                    raise ValueError(f"unsupported:{name}")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    # diffuserve's live denoising view (not an OpenAI field): each chunk's choice carries "canvas", the events of the
    # steps since the previous chunk (engine/canvas.py); "full" adds the whole canvas to every event.
    include_canvas: bool | Literal["full"] = False


class SamplingFields(DiffusionFields):
    """The OpenAI fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only when scoring a prompt (echo with logprobs)
    temperature: float | None = Field(
        default=None, ge=0, le=2,
        description="Omitted: the server's default, 0 (greedy) unless its config sets decoding option temperature "
        "(`--option temperature=1.0` gives OpenAI's default). Greedy is the default because the methods choose which "
        "masks to unmask by the model's confidence and LLaDA's and Dream's published results decode greedily; "
        "sampling at 1.0 lowers the quality of a diffusion LM's output more than of an autoregressive model's.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    # vLLM's: -1 or 0 is off (accepted by every method); other values only by the methods that sample top-k (Dream's)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # lt: the document writes the bound as a float, 2**63
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's: no EOS / end-of-turn token among the first min_tokens generated tokens, or in any (ignore_eos: every
    # choice is max_tokens long unless a stop string ends it).
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    # The k most likely tokens at the step each token settled (OpenAI allows up to 5 here, vLLM 20). With echo, the
    # prompt is scored instead: its tokens' shares of the Monte-Carlo ELBO (engine/decoding/score.py).
    logprobs: int | None = Field(default=None, ge=0, le=20)
    mc_samples: int | None = Field(default=None, ge=1, le=1024)  # scoring: Monte-Carlo samples (default 32)
    score_from: int | None = Field(default=None, ge=1)  # scoring: prompt tokens before this index are given


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # needs logprobs: true (OpenAI's rule)


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's shape: a prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # A prompt given as chat messages is rendered like `messages`: lm-evaluation-harness's remote tokenizer sends
    # the chat history that way with --apply_chat_template.
    prompt: str | list[ChatMessage] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def model_card(served: str, max_model_len: int) -> dict:
    """The /v1/models entry; known from the config before the weights load."""
    return {"id": served, "object": "model", "created": 0, "owned_by": "diffuserve", "max_model_len": max_model_len}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int,
                        tops: list[list[tuple[str, float]]] | None = None) -> dict:
    """`tops`: each token's alternatives, most likely first, or None for a token without any (a scored prompt's
    first); no `tops` at all: each token itself (logprobs=0)."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    if tops:
        top = [None if alts is None else dict(alts) for alts in tops]
    else:
        top = [{t: lp} for t, lp in zip(tokens, logprobs)]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float],
                  tops: list[list[tuple[str, float]]] | None = None) -> dict:
    tops = tops or [[] for _ in tokens]
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in alts]}
                        for t, lp, alts in zip(tokens, logprobs, tops)]}


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
