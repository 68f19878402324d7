"""Server behaviour under overload and disconnects on the real tiny-text model, with the client's ledger checked
against /metrics. SIGTERM drain: tests/reliability/test_process.py."""

from __future__ import annotations

import random
import re
import threading
import time

import httpx

from conftest import server_process

LONG = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 512, "steps": 512}  # one token per step


def config(tmp_path, **engine) -> str:
    lines = ["model:", "  path: tiny-text", "  served_model_name: tiny-text", "engine:"]
    lines += [f"  {k}: {v}" for k, v in engine.items()]
    path = tmp_path / "serve.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def metric(base: str, name: str, **labels) -> float:
    text = httpx.get(base + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_idle(base: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metric(base, "diffuserve:num_requests_running") == metric(base, "diffuserve:num_requests_waiting") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("server did not become idle")


def test_overload_rejects_exactly_the_extra_requests(tmp_path):
    R, Q, K = 2, 3, 4
    with server_process("--config", config(tmp_path, max_running=R, max_waiting=Q)) as (_, base):
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def send():
            r = httpx.post(base + "/v1/completions", json={**LONG, "max_tokens": 256, "steps": 256}, timeout=300)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=send) for _ in range(R + Q + K)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        rejected = [r for r in results if r.status_code == 429]
        assert codes == [200] * (R + Q) + [429] * K, codes
        assert all(r.headers.get("retry-after") and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
        assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                   for r in results if r.status_code == 200)
        ok = R + Q
        assert metric(base, "diffuserve:requests_total", outcome="finished") == ok
        assert metric(base, "diffuserve:requests_total", outcome="rejected") == K
        tokens = sum(r.json()["usage"]["completion_tokens"] for r in results if r.status_code == 200)
        prompt = sum(r.json()["usage"]["prompt_tokens"] for r in results if r.status_code == 200)
        assert metric(base, "diffuserve:generation_tokens_total") == tokens
        assert metric(base, "diffuserve:prompt_tokens_total") == prompt
        assert metric(base, "diffuserve:e2e_request_latency_seconds_count") == ok
        assert metric(base, "diffuserve:forward_passes_per_request_count") == ok
        # vLLM's names: finished requests by reason, queue time per admitted request, the pool empty again.
        assert sum(metric(base, "diffuserve:request_success_total", finished_reason=r) for r in ("stop", "length")) == ok
        assert metric(base, "diffuserve:request_success_total", finished_reason="abort") == 0
        assert metric(base, "diffuserve:request_queue_time_seconds_count") == ok
        assert metric(base, "diffuserve:request_generation_tokens_sum") == tokens
        assert metric(base, "diffuserve:kv_cache_usage_perc") == 0
        exported = httpx.get(base + "/metrics").text
        for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_bucket",
                     "time_per_output_token_seconds_bucket", "tokens_committed_per_step_bucket",
                     "query_rows_per_step_bucket", "refreshes_total", "kv_cache_bytes_in_use",
                     "far_field_tokens_pruned_per_step_bucket", "engine_steps_total"):
            assert f"diffuserve:{name}" in exported, name
        assert metric(base, "diffuserve:refreshes_total") > 0 and metric(base, "diffuserve:kv_cache_bytes_in_use") == 0
        print(f"FIGURE held={R + Q} rejected={K} sent={R + Q + K} ok={ok} lost=0 metric_vs_ledger_diff=0")


def test_200_disconnects_leak_nothing(tmp_path):
    """Clients leave while queued, during the first step and mid-stream, streaming and not; every request is
    aborted at a step boundary and nothing stays held."""
    N = 200
    with server_process("--config", config(tmp_path, max_running=8, max_waiting=256)) as (_, base):
        rng = random.Random(0)
        plans = [(rng.choice(["stream", "plain"]), rng.choice([0.0, 0.05, 0.3]), rng.randint(1, 5)) for _ in range(N)]

        def client(plan):
            mode, wait, chunks = plan
            try:
                if mode == "plain":  # the client gives up after `wait` seconds
                    httpx.post(base + "/v1/completions", json=LONG, timeout=max(wait, 0.02))
                    return "finished"
                with httpx.stream("POST", base + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
                    if wait:  # read a few chunks, then go
                        for i, _ in enumerate(r.iter_lines()):
                            if i >= chunks:
                                break
                return "left"
            except httpx.TimeoutException:
                return "left"

        sem = threading.Semaphore(24)
        outcomes = []

        def run(plan):
            with sem:
                outcomes.append(client(plan))

        threads = [threading.Thread(target=run, args=(p,)) for p in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_idle(base)
        assert outcomes.count("left") == N
        aborted = metric(base, "diffuserve:requests_total", outcome="aborted")
        finished = metric(base, "diffuserve:requests_total", outcome="finished")
        kv = metric(base, "diffuserve:kv_cache_bytes_in_use")
        print(f"FIGURE disconnects={N} aborted_metric={aborted:.0f} leaked_slots=0 kv_bytes_delta={kv:.0f}")
        assert aborted == N and finished == 0 and kv == 0
