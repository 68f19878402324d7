"""Prometheus metrics, one registry per engine, under a configurable prefix (`diffuserve:` by default).

The request-level series carry vLLM's names, labels and meanings (`num_requests_running`, `kv_cache_usage_perc`,
`request_success_total{finished_reason}`, `time_to_first_token_seconds`, `inter_token_latency_seconds`,
`request_queue_time_seconds`, ...), so that a dashboard built for vLLM reads them once the prefix matches (serve
with `--metrics-prefix vllm` to use one unchanged). Beside them, what only a diffusion engine has: forwards per
request, tokens committed and query rows per step, far-field pruning, window refreshes. No `*_created` series.

The engine calls the `on_*` hooks from its thread; the server counts rejections (429/503) with `on_rejected`.
Request outcomes (`requests_total{outcome}`): finished, aborted (client gone, deadline, shutdown), rejected, error.
"""

from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

prometheus_client.disable_created_metrics()  # a vLLM scrape has no *_created series; they double every counter

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
GAPS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
OUTCOMES = ("finished", "aborted", "rejected", "error")
# vLLM's finished_reason values; ours map onto them (a deadline or a client gone is an abort).
FINISHED_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "timeout": "abort", "error": "error"}


class Metrics:
    def __init__(self, model_name: str, prefix: str = "diffuserve"):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        p = prefix + ":"

        def one(kind, name, doc, **kw):
            """A series labelled by model only, exported from the start (at 0) so that dashboards find it."""
            metric = kind(p + name, doc, labelnames=["model_name"], registry=r, **kw)
            metric.labels(model_name)
            return metric

        def hist(name, doc, buckets):
            return one(Histogram, name, doc, buckets=buckets)

        # -- vLLM's names ------------------------------------------------------------------------------------------
        self.running = one(Gauge, "num_requests_running", "Requests in the running set")
        self.waiting = one(Gauge, "num_requests_waiting", "Requests in the waiting queue")
        self.kv_usage = one(Gauge, "kv_cache_usage_perc", "Fraction of the KV pool held by requests (1 = full)")
        self.success = Counter(p + "request_success", "Ended requests by finish reason",
                               ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prompt tokens of ended requests")
        self.generation_tokens = one(Counter, "generation_tokens", "Generated tokens (before EOS / stop string)")
        self.ttft = hist("time_to_first_token_seconds", "Arrival to first settled output", LATENCY)
        self.itl = hist("inter_token_latency_seconds", "Time between two settled outputs of a request, per token",
                        GAPS)
        self.tpot = hist("time_per_output_token_seconds", "Decode time per generated token", LATENCY)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to end", LATENCY)
        self.queue = hist("request_queue_time_seconds", "Arrival to admission into the running set", LATENCY)
        self.inference = hist("request_inference_time_seconds", "Admission to end", LATENCY)
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens per request", COUNTS)
        self.generation_len = hist("request_generation_tokens", "Generated tokens per request", COUNTS)
        # -- ours ----------------------------------------------------------------------------------------------------
        self.kv_bytes = one(Gauge, "kv_cache_bytes_in_use", "KV pool bytes held by requests")
        self.requests = Counter(p + "requests", "Requests by outcome", ["model_name", "outcome"], registry=r)
        self.passes = hist("forward_passes_per_request", "Model forwards a request took part in", COUNTS)
        self.committed = hist("tokens_committed_per_step", "Tokens committed in one engine step", COUNTS)
        self.rows = hist("query_rows_per_step", "Query rows computed in one engine step", COUNTS)
        self.pruned = hist("far_field_tokens_pruned_per_step",
                           "Canvas positions neither computed nor attended in one step", COUNTS)
        self.refreshes = one(Counter, "refreshes", "Window refresh steps")
        self.steps = one(Counter, "engine_steps", "Batched engine steps")
        self.batch = hist("requests_per_step", "Requests computed in one engine step", COUNTS)
        for outcome in OUTCOMES:
            self.requests.labels(model_name, outcome)
        for reason in sorted(set(FINISHED_REASONS.values())):
            self.success.labels(model_name, reason)

    def _m(self, metric):
        return metric.labels(self.model_name)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def on_queues(self, running: int, waiting: int, kv_bytes: int, kv_usage: float) -> None:
        self._m(self.running).set(running)
        self._m(self.waiting).set(waiting)
        self._m(self.kv_bytes).set(kv_bytes)
        self._m(self.kv_usage).set(kv_usage)

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
        reason = req.finish_reason if outcome == "finished" else ("error" if outcome == "error" else "abort")
        self.success.labels(self.model_name, FINISHED_REASONS.get(reason, "stop")).inc()
        self._m(self.prompt_tokens).inc(len(req.prompt_ids))
        self._m(self.generation_tokens).inc(completion_tokens)
        self._m(self.prompt_len).observe(len(req.prompt_ids))
        self._m(self.generation_len).observe(completion_tokens)
        now = req.finished_at or time.monotonic()
        self._m(self.e2e).observe(now - req.arrival)
        self._m(self.passes).observe(req.forward_calls)
        if req.admitted_at is not None:
            self._m(self.queue).observe(req.admitted_at - req.arrival)
            self._m(self.inference).observe(now - req.admitted_at)
        for gap in req.token_gaps:
            self._m(self.itl).observe(gap)
        if req.first_output_at is not None:
            self._m(self.ttft).observe(req.first_output_at - req.arrival)
            if completion_tokens > 1:
                self._m(self.tpot).observe((now - req.first_output_at) / (completion_tokens - 1))

    def on_rejected(self) -> None:
        self.requests.labels(self.model_name, "rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
