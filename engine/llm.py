"""LLM: a loaded checkpoint (model + tokenizer) and one-call generation through any registered method.

This is the offline entry point used by the CLI and the conformance runner's callers; the server's scheduler
builds on the same model and methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch

from .config import DEFAULT_METHOD
from . import offline
from .decoding import DecodeOptions, Method, get_method
from .detokenizer import Completion, finish
from .model import DiffusionLM, load_model
from .model.bundled import resolve_model
from .model.tokenizer import chat_ids, load_tokenizer


@dataclass
class Generation:
    method: str
    prompt_ids: list[int]
    canvas_ids: list[int]  # every generated position, as decoding left it
    completion: Completion
    forward_calls: int
    wall_time_s: float


class LLM:
    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
        model_dir = resolve_model(model_dir)  # a bundled model's name works too
        self.model_dir = model_dir
        self.model: DiffusionLM = load_model(model_dir, dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.spec = self.model.spec

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer files: pass token ids instead of text")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"{self.model_dir} has no chat template")
            return chat_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    def default_method(self) -> str:
        return DEFAULT_METHOD[self.spec.family]

    def method(self, name: str | None) -> Method:
        """A method by name; None or "vanilla": the family's reference sampler (the baseline every method is
        measured against)."""
        m = get_method(self.default_method() if name in (None, "vanilla") else name)
        if not m.decodes(self.spec.family):
            raise ValueError(f"method {m.name!r} decodes {m.family} models, not {self.spec.family}")
        return m

    def generate(self, prompt_ids: list[int], method: str | None = None,
                 opts: DecodeOptions | Mapping[str, object] | None = None, seed: int = 0,
                 stop: list[str] | None = None) -> Generation:
        """opts: the method's options (`get_method(name).options`), or a name -> value mapping of them."""
        m = self.method(method)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        opts = m.make_options(opts)
        if len(prompt_ids) + opts.gen_length > self.spec.max_positions:
            raise ValueError(f"prompt ({len(prompt_ids)}) + gen_length ({opts.gen_length}) exceeds the model's "
                             f"{self.spec.max_positions} positions")
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
        t0 = time.perf_counter()
        result = offline.generate(self.model, m, prompt, opts, gen)
        wall = time.perf_counter() - t0
        canvas = result.ids[0].tolist()
        done = finish(canvas, self.tokenizer, self.spec.stop_ids, self.spec.mask_id, stop)
        return Generation(m.name, list(prompt_ids), canvas, done, result.forward_calls, wall)
