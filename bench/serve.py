"""Real HTTP load against a diffuserve server: fixed concurrency levels and Poisson arrival rates.

    python -m bench.serve                                   # starts `diffuserve serve` (bundled model) itself
    python -m bench.serve --base http://127.0.0.1:8000      # or loads a running server
    python -m bench.serve --concurrency 1,4,16,64 --rates 4,16 --max-tokens 64 --json out.json --plot docs/x.png
    python -m bench.serve --concurrency 1,16 --temperature 0.7       # sampled commits (default: the method's 0)

Every request streams (so time to first token is seen) with usage included. Per level it prints requests/s,
output tokens/s (completion tokens as usage counts them: before EOS, after stop-string truncation), TTFT, time per
output token, end-to-end latency p50/p99 and the ledger: sent = ok + rejected + aborted + failed, lost = the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import aclosing, contextmanager
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo, Romeo,", "KING LEAR.\n", "HAMLET.\nTo be, or not to be",
           "First Citizen.\nBefore we proceed any further,", "PORTIA.\nThe quality of mercy", "MACBETH.\n",
           "PROSPERO.\nOur revels now are ended."]


@dataclass
class Sample:
    status: str  # ok | rejected | aborted | failed
    start: float
    ttft: float | None = None
    end: float | None = None
    tokens: int = 0


@dataclass
class Level:
    kind: str  # "concurrency" or "rate"
    value: float
    wall_s: float = 0.0
    ledger: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class Stream:
    """One streamed POST over its own connection, read as SSE events. A bare HTTP/1.1 client on asyncio's streams:
    the load generator shares the server's two cores, and httpx's pure-Python parsing of every chunk cost about as
    much CPU per token as the server's own work, which would cap the concurrent levels by the client, not the
    server."""

    def __init__(self, base: str):
        url = urlsplit(base)
        self.host, self.port = url.hostname, url.port or 80

    async def events(self, path: str, body: dict) -> AsyncIterator[bytes | int]:
        """Yields the status code, then each event's bytes (without `data: ` and the blank line)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            data = json.dumps(body).encode()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            status = int((await reader.readline()).split()[1])
            chunked = False
            while (h := await reader.readline()) not in (b"\r\n", b""):
                chunked |= h.lower().startswith(b"transfer-encoding:") and b"chunked" in h.lower()
            yield status
            buf = b""
            async for piece in _body(reader, chunked):
                buf += piece
                *done, buf = buf.split(b"\n\n")
                for ev in done:
                    if ev.startswith(b"data: "):
                        yield ev[6:]
        finally:
            writer.close()


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:  # read to the connection's end
        while piece := await reader.read(65536):
            yield piece
        return
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk


async def one(client: Stream, prompt: str, max_tokens: int, timeout: float, extra: dict | None = None) -> Sample:
    s = Sample("failed", time.perf_counter())
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            **(extra or {})}
    try:
        await asyncio.wait_for(_read(client, body, s), timeout)
    except asyncio.TimeoutError:
        s.status = "aborted"
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):  # refused, reset, or not HTTP
        s.status = "failed"
    return s


async def _read(client: Stream, body: dict, s: Sample) -> None:
    async with aclosing(client.events("/v1/completions", body)) as events:
        status = await anext(events)
        if status in (429, 503):
            s.status = "rejected"
            return
        if status != 200:
            return
        async for ev in events:
            if ev == b"[DONE]":
                s.end, s.status = time.perf_counter(), "ok"
                return
            # Only the events that can matter are parsed: up to the first text, an error, the usage chunk.
            if s.ttft is None or b'"error":' in ev or b'"usage": {' in ev:
                obj = json.loads(ev)
                if "error" in obj:
                    return
                if s.ttft is None and any(c.get("text") for c in obj.get("choices", [])):
                    s.ttft = time.perf_counter() - s.start
                if obj.get("usage"):
                    s.tokens = obj["usage"]["completion_tokens"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def summarize(level: Level, samples: list[Sample], sent: int) -> Level:
    ok = [s for s in samples if s.status == "ok"]
    counts = {k: sum(s.status == k for s in samples) for k in ("ok", "rejected", "aborted", "failed")}
    level.ledger = {"sent": sent, **counts, "lost": sent - sum(counts.values())}
    tokens = sum(s.tokens for s in ok)
    e2e = [s.end - s.start for s in ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    tpot = [(s.end - s.start - s.ttft) / (s.tokens - 1) for s in ok if s.ttft is not None and s.tokens > 1]
    level.stats = {"requests_per_s": round(len(ok) / level.wall_s, 3),
                   "output_tokens_per_s": round(tokens / level.wall_s, 1),
                   "output_tokens": tokens, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
                   "tpot_p50": pct(tpot, 0.5), "tpot_p99": pct(tpot, 0.99), "e2e_p50": pct(e2e, 0.5),
                   "e2e_p99": pct(e2e, 0.99)}
    return level


async def run_concurrency(base: str, c: int, n: int, max_tokens: int, timeout: float,
                          extra: dict | None = None) -> Level:
    samples: list[Sample] = []
    counter = iter(range(n))
    client = Stream(base)

    async def worker():
        for i in counter:
            samples.append(await one(client, PROMPTS[i % len(PROMPTS)], max_tokens, timeout, extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    level = Level("concurrency", c, wall_s=time.perf_counter() - t0)
    return summarize(level, samples, n)


async def run_rate(base: str, rate: float, n: int, max_tokens: int, timeout: float, seed: int,
                   extra: dict | None = None) -> Level:
    rng = random.Random(seed)
    client, tasks = Stream(base), []
    t0 = time.perf_counter()
    for i in range(n):
        tasks.append(asyncio.create_task(one(client, PROMPTS[i % len(PROMPTS)], max_tokens, timeout, extra)))
        await asyncio.sleep(rng.expovariate(rate))
    samples = await asyncio.gather(*tasks)
    level = Level("rate", rate, wall_s=time.perf_counter() - t0)
    return summarize(level, list(samples), n)


@contextmanager
def spawned_server(model: str | None, extra: list[str]):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "diffuserve.tools.cli", "serve", *([model] if model else []), "--port", str(port),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def line(level: Level) -> str:
    s, led = level.stats, level.ledger
    return (f"{level.kind:>11} {level.value:>6g} | {s['requests_per_s']:7.2f} req/s "
            f"{s['output_tokens_per_s']:8.1f} tok/s"
            f" | TTFT p50 {s['ttft_p50']} p99 {s['ttft_p99']} | TPOT p50 {s['tpot_p50']} p99 {s['tpot_p99']}"
            f" | E2E p50 {s['e2e_p50']} p99 {s['e2e_p99']} | {led}")


def plot(levels: list[Level], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [lv for lv in levels if lv.kind == "concurrency"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [lv.value for lv in conc]
    axes[0].plot(xs, [lv.stats["output_tokens_per_s"] for lv in conc], "o-")
    axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="Throughput")
    axes[0].set_xticks(xs, [str(int(x)) for x in xs])
    axes[1].plot(xs, [lv.stats["e2e_p50"] for lv in conc], "o-", label="E2E p50")
    axes[1].plot(xs, [lv.stats["ttft_p50"] for lv in conc], "s-", label="TTFT p50")
    axes[1].set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="Latency")
    axes[1].set_xticks(xs, [str(int(x)) for x in xs])
    axes[1].legend()
    fig.suptitle("diffuserve bench.serve (bundled tiny-text, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a running server's URL; default: start one")
    p.add_argument("--model", help="model for the started server (default: the bundled tiny-text)")
    p.add_argument("--server-args", default="", help="extra `diffuserve serve` flags for the started server")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--rates", default="", help="Poisson arrival rates (requests/s), comma-separated")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 4 x concurrency, >= 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--temperature", type=float, help="sent with every request (default: none, the method's own: 0)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args(argv)
    extra = {} if args.temperature is None else {"temperature": args.temperature}

    async def all_levels(base: str) -> list[Level]:
        out = []
        await run_concurrency(base, 2, 4, args.max_tokens, args.timeout, extra)  # warm-up, not reported
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            out.append(await run_concurrency(base, c, args.requests or max(8, 4 * c), args.max_tokens, args.timeout,
                                             extra))
            print(line(out[-1]), flush=True)
        for r in [float(x) for x in args.rates.split(",") if x]:
            out.append(await run_rate(base, r, args.requests or max(16, int(4 * r)), args.max_tokens, args.timeout, 0,
                                      extra))
            print(line(out[-1]), flush=True)
        return out

    if args.base:
        levels = asyncio.run(all_levels(args.base))
    else:
        with spawned_server(args.model, args.server_args.split()) as base:
            levels = asyncio.run(all_levels(base))
    conc = {lv.value: lv.stats["output_tokens_per_s"] for lv in levels if lv.kind == "concurrency"}
    if 1 in conc and 16 in conc:
        print(f"speed-up of aggregate output tokens/s, concurrency 16 over 1: {conc[16] / conc[1]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(lv) for lv in levels], f, indent=1)
    if args.plot:
        plot(levels, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
