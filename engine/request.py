"""Request: one generation's whole state, from arrival to its last output, with an explicit phase.

A request owns its decoding state (the method's `DecodeState`: canvas, partitions, step, the method's own phase),
its KV handle into the shared pool, how much of its settled output it has already emitted, and its stream
detokenizer. The scheduler only moves requests between queues; the engine loop steps them and calls `emit`.
Outputs go to `sink`, a callable the async front supplies (it forwards them to the event loop thread-safely).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .decoding import DecodeOptions, Method
from .canvas import CanvasView
from .decoding.step import DecodeState
from .detokenizer import StreamDetokenizer, cut_at_stop, finish
from .model.kv_pool import KVHandle


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds nothing
    RUNNING = "running"  # admitted: holds a KV handle and a decoding state
    FINISHED = "finished"  # ended normally (EOS, stop string or length)
    ABORTED = "aborted"  # client gone, deadline passed or server stopping
    FAILED = "failed"  # its own generation raised; no other request is touched


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new final text since the previous output
    token_ids: list[int]  # new settled tokens since the previous output
    logprobs: list[float]  # their log-probabilities (where the method records them)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: (id, logprob) alternatives
    prompt_logprobs: list[float | None] | None = None  # prompt scoring (decoding.score): with the last output
    canvas: list[dict] = field(default_factory=list)  # the live view's step events since the previous output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" (finished), "abort" | "timeout" | "error"
    error: str | None = None
    status: int = 200  # with an error: 400 when the request itself was invalid, 500 otherwise
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_calls: int = 0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    method: Method
    opts: DecodeOptions  # the method's own options class (Method.options), or a name -> value mapping for it
    seed: int
    sink: Callable[[RequestOutput], None]
    tokenizer: object = None
    stop_ids: tuple[int, ...] = ()
    mask_id: int = -1
    stops: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() after which the engine ends it
    phase: RequestStatus = RequestStatus.WAITING
    state: DecodeState | None = None
    kv: KVHandle | None = None
    emitted: int = 0  # settled generated tokens already sent
    settled: int = 0  # length of the settled prefix at the last emit
    abort_reason: str | None = None  # set from any thread; acted on at the next step boundary
    finish_reason: str | None = None  # as its last output said: stop, length, abort, timeout, error
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # entered the running set (queue time = admitted_at - arrival)
    first_output_at: float | None = None
    last_output_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # per-token time between two outputs (inter-token latency)
    finished_at: float | None = None
    forward_calls: int = 0
    completion_tokens: int = 0  # known once finished: tokens before EOS or the stop string
    # Parity cases only: rows of the reference's own batch, decoded as one state (prompt_ids is row 0). A server
    # request is one sequence.
    batch_prompts: list[list[int]] | None = None
    gen: torch.Generator | None = None  # its random stream; None: a generator seeded with `seed`
    top_logprobs: int = 0  # alternatives to report per generated token
    min_tokens: int = 0  # no stop token (EOS, EoT) among the first this many generated tokens (ignore_eos: all)
    group: str = ""  # the body it came in (its prompts x n choices share the engine as one; "": its own)
    waited: int = 0  # engine steps in a row it ran without being computed (Scheduler.batch serves the longest first)
    canvas_view: CanvasView | None = None  # the live denoising view: one event per step (engine.canvas)

    def __post_init__(self):
        self.opts = self.method.make_options(self.opts)  # a ValueError names an option the method does not read
        self.detok = StreamDetokenizer(self.tokenizer, self.stops)
        self.group = self.group or self.request_id
        self.events: list[dict] = []  # canvas events not yet sent
        if self.gen is None:
            self.gen = torch.Generator().manual_seed(self.seed)

    @property
    def capacity(self) -> int:
        """Cache slots its state needs: one per canvas position, by default."""
        rows = 1 if self.batch_prompts is None else len(self.batch_prompts)
        return self.method.state.slots_needed(rows, len(self.prompt_ids) + self.opts.gen_length, self.opts)

    def start(self, spec, kv: KVHandle) -> None:
        self.kv = kv
        prompt = torch.tensor(self.batch_prompts or [self.prompt_ids], dtype=torch.long)
        self.state = self.method.state(spec, prompt, self.opts, self.gen)
        if self.top_logprobs:
            self.state.want_top(self.top_logprobs)

    def plan(self):
        """The state's step plan, with the stop tokens banned where min_tokens says none may settle yet."""
        plan = self.state.plan()
        if self.min_tokens and self.stop_ids:
            bound = len(self.prompt_ids) + self.min_tokens
            shift = int(self.state.spec.shifted_logits)  # Dream: row p - 1 predicts position p
            for seg in plan.segments:
                rows = np.flatnonzero(seg.positions[seg.logits_rows] + shift < bound)
                if len(rows):
                    seg.ban = (rows, tuple(self.stop_ids))
        return plan

    def canvas(self) -> list[int]:
        return self.state.canvas().tolist()

    def emit(self, canvas: list[int], final: bool, logprobs: torch.Tensor | None = None,
             top: tuple[torch.Tensor, torch.Tensor] | None = None, event: dict | None = None) -> bool:
        """Send what the canvas has settled since the last call (and the step's canvas event, if the view is on);
        True if the output is complete (a stop token or string was reached, or `final`)."""
        if event is not None:
            self.events.append(event)
        settled, stopped = cut_at_stop(canvas, self.stop_ids, self.mask_id)
        if len(settled) == self.settled and not (final or stopped or self.events):
            return False  # this step committed only beyond the settled prefix: nothing new to decode or send
        self.settled = len(settled)
        text = self.detok.update(settled, final=final or stopped)
        complete = final or stopped or self.detok.stopped
        done = finish(canvas, self.tokenizer, self.stop_ids, self.mask_id, self.stops) if complete else None
        # Tokens go out with the text that covers them: none while text is held back (they might lie past a stop
        # string), and at the end exactly the completion's tokens.
        upto = len(done.token_ids) if complete else (self.emitted if self.detok.holding else len(settled))
        new = settled[self.emitted:upto]
        if not new and not text and not complete and not self.events:
            return False
        lp = [] if logprobs is None else logprobs[self.emitted:upto].tolist()
        alts = [] if top is None else [list(zip(i, v)) for i, v in zip(top[0][self.emitted:upto].tolist(),
                                                                      top[1][self.emitted:upto].tolist())]
        self.emitted = max(self.emitted, upto)
        out = RequestOutput(self.request_id, text, new, lp, alts, prompt_tokens=len(self.prompt_ids),
                            canvas=self.events)
        self.events = []
        if complete:
            out.finished, out.finish_reason = True, done.finish_reason
            out.prompt_logprobs = self.state.prompt_logprobs
            self.finish_reason = done.finish_reason
            self.completion_tokens = len(done.token_ids)
            out.completion_tokens, out.forward_calls = self.completion_tokens, self.forward_calls
            self.phase = RequestStatus.FINISHED
        if new or complete:
            now = time.monotonic()
            if self.first_output_at is None:
                self.first_output_at = now
            elif new:  # tokens settle in bursts: the gap is shared by the burst's tokens
                self.token_gaps += [(now - self.last_output_at) / len(new)] * len(new)
            self.last_output_at = now
        self.sink(out)
        return complete

    def end(self, phase: RequestStatus, reason: str, error: str | None = None, status: int = 500) -> None:
        """An abnormal end (abort, timeout, failure): one last output that says why."""
        self.phase, self.finish_reason = phase, reason
        self.sink(RequestOutput(self.request_id, "", [], [], finished=True, finish_reason=reason, error=error,
                                status=status, prompt_tokens=len(self.prompt_ids),
                                forward_calls=self.forward_calls))
