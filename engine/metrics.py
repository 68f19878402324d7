"""Prometheus metrics, vLLM-like names under the `diffuserve:` prefix, one registry per engine.

The engine calls the `on_*` hooks from its thread; the server counts rejections (429/503) with `on_rejected`.
Request outcomes: finished, aborted (client gone, deadline, shutdown), rejected, error.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
OUTCOMES = ("finished", "aborted", "rejected", "error")


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": r}
        self.running = Gauge("diffuserve:num_requests_running", "Requests in the running set", **label)
        self.waiting = Gauge("diffuserve:num_requests_waiting", "Requests in the waiting queue", **label)
        self.kv_bytes = Gauge("diffuserve:kv_cache_bytes_in_use", "KV pool bytes held by requests", **label)
        self.requests = Counter("diffuserve:requests", "Requests by outcome", ["model_name", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("diffuserve:prompt_tokens", "Prompt tokens of ended requests", **label)
        self.generation_tokens = Counter("diffuserve:generation_tokens",
                                         "Generated tokens (before EOS / stop string)", **label)
        self.ttft = Histogram("diffuserve:time_to_first_token_seconds", "Arrival to first settled output",
                              buckets=LATENCY, **label)
        self.tpot = Histogram("diffuserve:time_per_output_token_seconds", "Decode time per generated token",
                              buckets=LATENCY, **label)
        self.e2e = Histogram("diffuserve:e2e_request_latency_seconds", "Arrival to end", buckets=LATENCY, **label)
        self.passes = Histogram("diffuserve:forward_passes_per_request", "Model forwards a request took part in",
                                buckets=COUNTS, **label)
        self.committed = Histogram("diffuserve:tokens_committed_per_step", "Tokens committed in one engine step",
                                   buckets=COUNTS, **label)
        self.rows = Histogram("diffuserve:query_rows_per_step", "Query rows computed in one engine step",
                              buckets=COUNTS, **label)
        self.pruned = Histogram("diffuserve:far_field_tokens_pruned_per_step",
                                "Canvas positions neither computed nor attended in one step", buckets=COUNTS, **label)
        self.refreshes = Counter("diffuserve:refreshes", "Window refresh steps", **label)
        self.steps = Counter("diffuserve:engine_steps", "Batched engine steps", **label)
        self.batch = Histogram("diffuserve:requests_per_step", "Requests computed in one engine step",
                               buckets=COUNTS, **label)
        self.model_name = model_name
        for outcome in OUTCOMES:  # every outcome is exported from the start, at 0
            self.requests.labels(model_name, outcome)

    def _m(self, metric):
        return metric.labels(self.model_name)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def on_queues(self, running: int, waiting: int, kv_bytes: int) -> None:
        self._m(self.running).set(running)
        self._m(self.waiting).set(waiting)
        self._m(self.kv_bytes).set(kv_bytes)

    def on_step(self, stats, committed: int, refreshes: int) -> None:
        self._m(self.steps).inc()
        self._m(self.batch).observe(stats.requests)
        self._m(self.rows).observe(stats.rows)
        self._m(self.pruned).observe(stats.pruned)
        self._m(self.committed).observe(committed)
        self._m(self.refreshes).inc(refreshes)

    def on_finish(self, req, completion_tokens: int) -> None:
        outcome = {"finished": "finished", "aborted": "aborted", "failed": "error"}[req.phase.value]
        self.requests.labels(self.model_name, outcome).inc()
        self._m(self.prompt_tokens).inc(len(req.prompt_ids))
        self._m(self.generation_tokens).inc(completion_tokens)
        now = req.finished_at or time.monotonic()
        self._m(self.e2e).observe(now - req.arrival)
        self._m(self.passes).observe(req.forward_calls)
        if req.first_output_at is not None:
            self._m(self.ttft).observe(req.first_output_at - req.arrival)
            if completion_tokens > 1:
                self._m(self.tpot).observe((now - req.first_output_at) / (completion_tokens - 1))

    def on_rejected(self) -> None:
        self.requests.labels(self.model_name, "rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
