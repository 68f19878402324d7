"""Prompts: a body's prompt or messages -> token ids, checked, for the routes.

Tokenizing runs in a worker thread, never on the event loop: a long prompt takes seconds to tokenize, and every
stream's output would stop meanwhile. Before that, a prompt longer in bytes than the context could hold is refused
without tokenizing at all: no token of this vocabulary is longer than `token_bytes` bytes, so a prompt over
`max_model_len * token_bytes` bytes cannot fit. (Tokenizers that drop whitespace, word-level ones, can fit more
bytes than that in the context; such a prompt would be all blanks.) Chat goes through the model's template with
only its own markers special (model.tokenizer.chat_ids), and a mask token in a prompt is a 400.
"""

from __future__ import annotations

import asyncio

from diffuserve.engine.model.tokenizer import chat_ids, token_bytes

from .errors import APIError


class Prompts:
    def __init__(self, llm, max_prompts: int):
        self.llm, self.max_prompts = llm, max_prompts
        self.context = llm.spec.max_positions
        tok = llm.tokenizer
        self.max_bytes = None if tok is None else self.context * token_bytes(tok)

    def check_bytes(self, texts: list[str], param: str) -> None:
        """Refuse before tokenizing what could never fit the context."""
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if self.max_bytes is not None and size > self.max_bytes:
            raise APIError(400, f"the {param} has {size} bytes; at most {self.max_bytes} bytes can fit this model's "
                                f"context of {self.context} tokens", param, code="context_length_exceeded")

    async def completion(self, prompt) -> list[list[int]]:
        """A completion body's prompt (string, strings, ids, lists of ids) -> token id lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > self.max_prompts:
            raise APIError(400, f"at most {self.max_prompts} prompts per request", "prompt")
        for p in prompt:
            if isinstance(p, str):
                self.check_bytes([p], "prompt")
        out = []
        for p in prompt:
            ids = await self.text(p, special=True) if isinstance(p, str) else list(p)
            vocab = self.llm.spec.vocab_size
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", "prompt")
            self.check_no_mask(ids, "prompt")
            out.append(ids)
        return out

    async def text(self, text: str, special: bool = False) -> list[int]:
        """A plain prompt's ids; `special`: with the tokenizer's BOS/EOS added (/tokenize's add_special_tokens)."""
        tok = self.tokenizer("prompt")
        self.check_bytes([text], "prompt")
        try:
            return await asyncio.to_thread(lambda: tok(text, add_special_tokens=special)["input_ids"])
        except (ValueError, TypeError) as exc:  # TypeError: text the tokenizer cannot take (a lone surrogate)
            raise APIError(400, f"the prompt cannot be tokenized: {exc}", "prompt") from None

    async def chat(self, messages, add_generation_prompt: bool = True, generating: bool = True) -> list[int]:
        tok = self.llm.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template", "messages")
        convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        self.check_bytes([m["content"] for m in convo], "messages")
        try:
            ids = await asyncio.to_thread(chat_ids, tok, convo, add_generation_prompt)
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"the messages cannot be tokenized: {exc}", "messages") from None
        if generating:
            self.check_no_mask(ids, "messages")
        return ids

    def check_no_mask(self, ids: list[int], param: str) -> None:
        """The mask token in a prompt would be filled by the model like the canvas's own masks (and the answer
        left empty): not a feature this API offers, so a 400 rather than a silently different request."""
        if self.llm.spec.mask_id in ids:
            raise APIError(400, f"the {param} contains the mask token (id {self.llm.spec.mask_id}); diffusion "
                                "infilling of a prompt is not offered", param)

    def tokenizer(self, param: str | None = None):
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer files: it takes and returns token ids only", param)
        return self.llm.tokenizer
