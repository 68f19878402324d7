"""SSE: a request group's outputs -> `data: {json}\\n\\n` events, then `data: [DONE]`; and the non-streamed body.

Both paths read the same outputs, so streamed and non-streamed text are equal for the same seed. Per choice the
stream sends text as it settles, exactly one chunk with a finish_reason, and (chat) the role in its first delta.
An error after the stream has begun ends it with an error event, then [DONE].
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from diffuserve.engine.request import RequestOutput

from .protocol import chat_logprobs, completion_logprobs, error_body, usage


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prefix: str = ""  # echoed prompt text (completions with echo)
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[str, float]]] = field(default_factory=list)  # each token's alternatives (top_logprobs)
    prompt_tokens: list[str] = field(default_factory=list)  # prompt scoring (echo + logprobs): the prompt's
    prompt_logprobs: list[float | None] | None = None  # tokens and their ELBO shares
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: RequestOutput | None = None


@dataclass
class Job:
    """One HTTP body's work: its choices, the prompt token count, how to render each kind of chunk."""

    rid: str
    model: str
    chat: bool
    choices: list[Choice]
    prompt_tokens: int
    token_text: object  # ids -> list of token strings (for logprobs)
    want_logprobs: bool = False
    include_usage: bool = False

    def absorb(self, i: int, out: RequestOutput) -> dict | None:
        """Fold one output into its choice; -> the chunk's choice object to stream, or None."""
        c = self.choices[i]
        if out.error is not None or out.finish_reason in ("abort", "timeout"):
            c.error = out
            return None
        toks = self.token_text(out.token_ids) if self.want_logprobs else []
        tops = [list(zip(self.token_text([i for i, _ in alts]), [v for _, v in alts])) for alts in out.top]
        offset = len(c.prefix) + len(c.text)
        c.text += out.text
        c.tokens += toks
        c.logprobs += out.logprobs if self.want_logprobs else []
        c.tops += tops
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            c.finish_reason, c.completion_tokens = out.finish_reason, out.completion_tokens
        if not out.text and not out.finished and not out.canvas:
            return None
        lp = None
        if self.want_logprobs:
            lp = (chat_logprobs(toks, out.logprobs, tops) if self.chat
                  else completion_logprobs(toks, out.logprobs, offset, tops))
        if self.chat:
            delta = {"content": out.text} if out.text else {}
            piece = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}
        else:
            piece = {"index": c.index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}
        if out.canvas:  # each committed [position, token, probability] gets the token's text, for the page
            piece["canvas"] = [{**ev, "committed": [[*c, t] for c, t in zip(
                ev["committed"], self.token_text([c[1] for c in ev["committed"]]))]} for ev in out.canvas]
        return piece

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))

    def first_error(self) -> RequestOutput | None:
        return next((c.error for c in self.choices if c.error is not None), None)

    def chunk(self, choices: list[dict]) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    @staticmethod
    def scored(c: Choice) -> dict:
        """Echo + logprobs: the prompt's tokens with their ELBO shares (the first None, as OpenAI's echo), then the
        generated ones. A prompt token's top_logprobs holds only itself: alternatives are not estimated."""
        prompt_tops = [None if v is None else [(t, v)] for t, v in zip(c.prompt_tokens, c.prompt_logprobs)]
        gen_tops = c.tops or [[(t, v)] for t, v in zip(c.tokens, c.logprobs)]
        return completion_logprobs(c.prompt_tokens + c.tokens, c.prompt_logprobs + c.logprobs, 0,
                                   prompt_tops + gen_tops)

    def body(self) -> dict:
        """The non-streamed response."""
        choices = []
        for c in self.choices:
            lp = None
            if self.want_logprobs and c.prompt_logprobs is not None:
                lp = self.scored(c)
            elif self.want_logprobs:
                lp = (chat_logprobs(c.tokens, c.logprobs, c.tops) if self.chat
                      else completion_logprobs(c.tokens, c.logprobs, len(c.prefix), c.tops))
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": c.prefix + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices, "usage": self.usage()}


def error_of(out: RequestOutput) -> tuple[int, dict]:
    if out.finish_reason == "timeout":
        return 504, error_body("the request did not finish before its deadline", "timeout_error")
    if out.finish_reason == "abort":
        return 503, error_body("the request was aborted", "server_error")
    if out.status == 400:
        return 400, error_body(out.error or "invalid request")
    return 500, error_body(out.error or "generation failed", "server_error")


async def events(job: Job, outputs: AsyncIterator[tuple[int, RequestOutput]],
                 first: list[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    """The SSE body. `first`: outputs already read (the route waits for one before answering 200)."""
    if job.chat:
        yield job.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in job.choices])
    for c in job.choices:
        if c.prefix:
            yield job.chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])

    async def all_outputs():
        for item in first:
            yield item
        async for item in outputs:
            yield item

    try:
        async for i, out in all_outputs():
            piece = job.absorb(i, out)
            err = job.choices[i].error
            if err is not None:
                yield f"data: {json.dumps(error_of(err)[1])}\n\n"
                break
            if piece is not None:
                yield job.chunk([piece])
        else:
            if job.include_usage:
                body = {"id": job.rid, "object": "chat.completion.chunk" if job.chat else "text_completion",
                        "created": int(time.time()), "model": job.model, "choices": [], "usage": job.usage()}
                yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # a disconnect closes this generator: close the group's too, which aborts what is still running
        await outputs.aclose()
