"""The server as a process: B.4 #11 SIGTERM drain (drain timeout 60 and 0), #12 health and readiness through
loading, warming, ready, draining and dead, #13's fatal half (a dead engine ends the process, non-zero), #20 secure
defaults. Real `diffuserve serve` processes on the bundled tiny-text model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import wait_until_ready

from .conftest import free_port
from .ledger import figure

REPO = Path(__file__).resolve().parents[2]
LONG = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 192, "steps": 192, "stream": True}


def config(tmp_path, **engine) -> str:
    lines = ["model:", "  path: tiny-text", "engine:"] + [f"  {k}: {v}" for k, v in engine.items()]
    path = tmp_path / "serve.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def spawn(*args: str, env: dict | None = None):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "diffuserve.tools.cli", "serve", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    return proc, log


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def probe(base: str) -> tuple[int, int]:
    def get(path):
        try:
            return httpx.get(base + path, timeout=2).status_code
        except httpx.HTTPError:
            return 0
    return get("/health"), get("/ready")


def wait_ready(proc, base: str, seen: list | None = None) -> float:
    """conftest.wait_until_ready, keeping the distinct (health, ready) states seen, in order."""
    def note(state):
        if seen is not None and (not seen or seen[-1] != state):
            seen.append(state)
    return wait_until_ready(proc, base, note)


def stream(base: str, results: list) -> None:
    finish, done, error = None, False, None
    try:
        with httpx.stream("POST", base + "/v1/completions", json=LONG, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    body = json.loads(line[6:])
                    if "error" in body:
                        error = body["error"]["type"]
                    elif body["choices"] and body["choices"][0]["finish_reason"]:
                        finish = body["choices"][0]["finish_reason"]
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    results.append((finish, error, done))


def running(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    return float(re.search(r"^diffuserve:num_requests_running\S* (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("drain_timeout", [300, 0])
def test_sigterm_drain(tmp_path, drain_timeout):
    """10 streams in flight, SIGTERM, new requests keep coming: /ready 503 at once, new requests 503, the streams
    finish (drain limit 300 s: they take ~8 s on 2 idle cores, and over 60 s on busy ones) or end with an abort
    error event then [DONE] (limit 0), exit 0, no children left."""
    port, streams = free_port(), 10
    proc, log = spawn("--config", config(tmp_path, drain_timeout_s=drain_timeout), "--port", str(port))
    base, states = f"http://127.0.0.1:{port}", []
    try:
        wait_ready(proc, base, states)
        results: list = []
        threads = [threading.Thread(target=stream, args=(base, results)) for _ in range(streams)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while running(base) < streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(base) == streams
        kids = children(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        rejected = 0
        ready_after = probe(base)[1]
        for _ in range(3):  # new requests while draining
            try:
                r = httpx.post(base + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 4, "steps": 4})
                rejected += r.status_code == 503 and "retry-after" in r.headers
            except httpx.HTTPError:  # the listener may already be closed (drain 0)
                rejected += 1
        for t in threads:
            t.join()
        code = proc.wait(timeout=drain_timeout + 30)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    orphans = [k for k in kids if Path(f"/proc/{k}").exists()]
    completed = sum(f in ("stop", "length") and d and e is None for f, e, d in results)
    aborted = sum(e == "server_error" and d for f, e, d in results)
    assert ready_after in (503, 0) and rejected == 3 and code == 0 and not orphans
    assert exit_s < drain_timeout + 5
    if drain_timeout:
        assert completed == streams, results
    else:
        assert aborted == streams, results
    figure(f"sigterm_drain_{drain_timeout}s", inflight_at_sigterm=streams, completed_after=completed,
           aborted=aborted, rejected_new=rejected, exit_s=round(exit_s, 1), exit_code=code, orphans=len(orphans))


def test_health_and_readiness_states(tmp_path):
    """loading (health 200, ready 503) -> warming -> ready (both 200) -> draining (ready 503); and a server whose
    model fails to load is dead: health 503, then the watchdog exits it with status 1."""
    port = free_port()
    proc, log = spawn("--config", config(tmp_path, drain_timeout_s=30), "--port", str(port))
    base, seen, verified = f"http://127.0.0.1:{port}", [], set()
    try:
        time_to_ready = wait_ready(proc, base, seen)
        assert (200, 503) in seen and seen[-1] == (200, 200), seen  # loading was observed, then ready
        verified |= {"loading", "ready"}
        log.seek(0)
        text = log.read()
        assert "loading -> warming" in text and "warming -> ready" in text  # warming came between, /ready 503
        verified.add("warming")
        results: list = []
        t = threading.Thread(target=stream, args=(base, results))
        t.start()
        while running(base) < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert probe(base) == (200, 503) and httpx.get(base + "/ready").json()["status"] == "draining"
        verified.add("draining")
        t.join()
        assert proc.wait(timeout=60) == 0 and results[0][0] in ("stop", "length")
    finally:
        if proc.poll() is None:
            proc.kill()
    # Dead: a checkpoint whose weights are corrupt. The server listens, fails to load, reports 503, exits 1.
    bad = tmp_path / "broken-model"
    shutil.copytree(REPO / "models" / "tiny-text", bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    port = free_port()
    proc, log = spawn(str(bad), "--port", str(port))
    base, health = f"http://127.0.0.1:{port}", []
    try:
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:
            health.append(probe(base)[0])
            time.sleep(0.1)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 503 in health and code == 1, (health[-5:], code)
    verified.add("dead")
    figure("health_states", time_to_ready_s=round(time_to_ready, 1), states_verified=f"{len(verified)}/5")


def test_secure_defaults():
    """No flags: loopback only; no pickle or torch.load anywhere a request could reach; /docs can be turned off."""
    from diffuserve.engine.config import build_config

    cfg = build_config(None)
    assert cfg.server.host == "127.0.0.1" and cfg.server.api_key is None and not cfg.server.cors_origins
    assert not build_config(None, server__docs=False).server.docs
    port = free_port()
    proc, log = spawn(env={"DIFFUSERVE_PORT": str(port), "DIFFUSERVE_DOCS": "0"})
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/playground").status_code == 404  # off with the docs
        listening = [ln.split() for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        ours = [f[1] for f in listening if f[3] == "0A" and int(f[1].split(":")[1], 16) == port]
        assert ours == ["0100007F:%04X" % port], ours  # bound to 127.0.0.1 only
        others = [a for a in _addresses() if not a.startswith("127.")]
        for addr in others:  # and unreachable on the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=1).close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    unsafe = []
    for path in list((REPO / "server").rglob("*.py")) + list((REPO / "engine").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"\bpickle\b", r"torch\.load\(", r"\bmarshal\.loads\(", r"(?<![.\w])eval\(", r"yaml\.load\("):
            if re.search(pattern, text):
                unsafe.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not unsafe, unsafe
    figure("secure_defaults", bind_addr="127.0.0.1", unsafe_deserialisers=len(unsafe), docs_can_be_disabled=1)


def _addresses() -> list[str]:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return []
    return [a for a in out.split() if "." in a]


def test_sigterm_during_start_up_stops_at_once(tmp_path):
    """SIGTERM while the model loads: nothing to drain, exit 0 without waiting for the load or warm-up (a container
    stopped during a long warm-up otherwise ran into Docker's 10 s kill)."""
    port = free_port()
    proc, log = spawn("--config", config(tmp_path, drain_timeout_s=60), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        end, status = time.monotonic() + 120, None
        while time.monotonic() < end and status not in ("loading", "warming", "ready"):
            try:
                status = httpx.get(base + "/ready", timeout=2).json()["status"]
            except httpx.HTTPError:
                time.sleep(0.02)
        assert status in ("loading", "warming"), status  # the server listens before it loads
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert code == 0, text[-2000:]
    assert "stopping during start-up" in text and "Traceback" not in text and "-> ready" not in text, text[-2000:]


def test_sigterm_during_warm_up_aborts_it():
    """The same during warm-up, with a fake engine whose warm-up would run for ever: the signal aborts it and asks
    uvicorn to exit at once, without the drain wait."""
    import uvicorn

    from diffuserve.server.app import DrainingServer
    from diffuserve.server.lifecycle import Lifecycle, Stage

    class Engine:
        aborted = drained = 0

        def abort_all(self, reason):
            self.aborted += 1
            return 1

        def drain(self):
            self.drained += 1

        def wait_idle(self, timeout):
            raise AssertionError("a start-up stop must not wait for the engine")

    life = Lifecycle()
    life.engine = Engine()
    life.to(Stage.WARMING)
    server = DrainingServer(uvicorn.Config(app=None), life, drain_timeout=60)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and life.engine.aborted == 1 and life.engine.drained == 0
    assert life.stage is Stage.DRAINING


def test_clients_gone_before_the_first_output_are_aborted_without_errors(tmp_path):
    """A client that leaves before anything came out: its request is aborted at a step boundary, with no 500 and no
    traceback (closing the output stream while its pending read still ran used to raise, each time)."""
    port = free_port()
    proc, log = spawn("--config", config(tmp_path), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"prompt": "ROMEO.\n", "max_tokens": 256, "method": "llada", "steps": 256}).encode()
    try:
        wait_ready(proc, base)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(0.5)  # admitted and stepping; llada's first output is a whole block away
        end = time.monotonic() + 120
        aborted = 0.0
        while time.monotonic() < end and aborted < 3:
            text = httpx.get(base + "/metrics").text
            aborted = float(re.search(r'^diffuserve:requests_total\{[^}]*outcome="aborted"[^}]*\} (\S+)$', text,
                                      re.M).group(1))
            time.sleep(0.2)
        assert aborted == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log.seek(0)
    text = log.read()
    errors = text.count("Traceback") + text.count(" ERROR ")
    figure("early_disconnect", clients_gone_before_output=3, aborted=int(aborted), errors_logged=errors)
    assert errors == 0, text[-3000:]


def test_a_stalled_engine_fails_health_and_the_watchdog_ends_the_server():
    """Work waiting and no step finishing for engine.stall_timeout_s: /health is 503 (liveness probes restart the
    process) until a step ends; the watchdog calls the server dead and stops it. A slow fake step (3 s) against a
    1 s bound stands in for a stuck one."""
    from .conftest import fake_server

    with fake_server(delay=3.0, engine__stall_timeout_s=1.0) as stack:
        assert httpx.get(stack.base + "/health").status_code == 200  # idle: not stalled, however long
        t = threading.Thread(target=lambda: httpx.post(stack.base + "/v1/completions", timeout=120,
                                                       json={"prompt": "ROMEO.\n", "max_tokens": 4}))
        t.start()
        stalled = None
        end = time.monotonic() + 60
        while time.monotonic() < end and stalled is None:
            r = httpx.get(stack.base + "/health")
            stalled = r.json()["status"] if r.status_code == 503 else None
            time.sleep(0.1)
        assert stalled is not None and stalled.startswith("engine stalled"), stalled
        t.join()
        assert stack.engine.wait_idle(60) and httpx.get(stack.base + "/health").status_code == 200

    from diffuserve.server.lifecycle import Lifecycle, Stage

    class Stuck:
        alive = True

        def stalled_for(self):
            return 5.0

    life, stopped = Lifecycle(), threading.Event()
    life.engine = Stuck()
    life.to(Stage.READY)
    life.watch(stopped.set, grace_s=0.0, every_s=0.05, stall_s=2.0)
    assert stopped.wait(30) and life.stage is Stage.DEAD and "stalled" in life.error
    figure("engine_stall", stall_bound_s=1.0, health_while_stalled=503, health_after_step=200, watchdog_stopped=1)


@pytest.mark.parametrize("method", ["llada", "window"])
def test_sigterm_with_a_long_request_running(tmp_path, method):
    """The longest requests a client can send (a 1,024-token canvas: vanilla `llada` one token per step over the
    whole canvas, or `window` recomputing the whole canvas every step, n = 4), then SIGTERM: the drain limit (3 s)
    ends them with 503 "aborted" answers, the process exits 0 within the limit plus a few seconds."""
    port, drain = free_port(), 3
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model:\n  path: tiny-task\nengine:\n  drain_timeout_s: {drain}\n")
    proc, log = spawn("--config", str(cfg), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "<|startoftext|><|user|>count down from w6 x1 y1 z2<|assistant|>", "max_tokens": 1024}
    body.update({"method": "llada", "n": 1} if method == "llada" else
                {"n": 4, "active_tokens": 1, "window_tokens": 1, "refresh_cycle": 1, "refresh": "full",
                 "threshold": 1.0, "eos_early_exit": False})
    answers: list = []

    def ask():
        try:
            r = httpx.post(base + "/v1/completions", json=body, timeout=300)
            answers.append((r.status_code, r.json().get("error", {}).get("message")))
        except httpx.HTTPError as exc:
            answers.append((0, type(exc).__name__))

    try:
        wait_ready(proc, base)
        client = threading.Thread(target=ask)
        client.start()
        deadline = time.monotonic() + 300
        while running(base) < body["n"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(base) == body["n"]
        time.sleep(1.0)  # well inside the request (its steps run for minutes)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=drain + 60)
        exit_s = time.monotonic() - t0
        client.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert code == 0, text[-3000:]
    assert answers == [(503, "the request was aborted")], answers
    assert exit_s < drain + 10, exit_s
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    figure(f"sigterm_long_{method}", n=body["n"], canvas=1024, drain_limit_s=drain, exit_code=code,
           exit_s=round(exit_s, 1), answer=answers[0][0])
