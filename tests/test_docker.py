"""The image, built and run as docker/README.md tells an operator: a base built from Debian's packages (no image
registry), `docker build` of the checkout, `docker run`, health "starting" until /ready is 200, a completion, and
`docker stop` ending with status 0. Skipped, with the reason, where no Docker daemon can run."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = os.environ.get("DIFFUSERVE_TEST_BASE", "diffuserve-base:bookworm")
TAG = "diffuserve:test"


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def daemon_up() -> bool:
    try:
        return docker("info", timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A running Docker daemon: the host's, or one this test starts (root and Debian's docker.io) and stops."""
    if not shutil.which("docker"):
        pytest.skip("no docker client on this machine (scripts/setup.sh --test installs docker.io where it can)")
    started = None
    if not daemon_up():
        if os.geteuid() != 0 or not shutil.which("dockerd"):
            pytest.skip("no Docker daemon is running, and this test can start one only as root with dockerd")
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "w")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while not daemon_up() and started.poll() is None and time.monotonic() < end:
            time.sleep(1)
        if not daemon_up():
            started.kill()
            reason = Path(log.name).read_text()[-600:]
            pytest.skip(f"a Docker daemon cannot run on this machine: {reason}")
    yield
    if started is not None:
        started.terminate()
        started.wait(timeout=60)


def torch_wheel(dest: Path) -> Path:
    """The CPU torch wheel this host's pip resolves (a local wheel or its mirror), for docker/wheels/."""
    import torch

    version = torch.__version__
    if "+" not in version:
        pytest.skip(f"the installed torch ({version}) is not a CPU build whose wheel could be handed to the image")
    done = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "pip", "download", "-q", "--no-deps", "--dest",
                           str(dest), f"torch=={version}"], capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("torch-*.whl"))
    if done.returncode or not wheels:
        pytest.skip(f"no wheel of torch=={version} reachable to hand to the image build: {done.stderr[-400:]}")
    return wheels[0]


def context_mb(build_log: str) -> float:
    size, unit = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", build_log).groups()
    return float(size) * {"B": 1e-6, "kB": 1e-3, "MB": 1, "GB": 1e3}[unit]


@pytest.fixture(scope="module")
def image(daemon):
    if docker("image", "inspect", BASE, check=False).returncode:
        if os.geteuid() != 0 or not shutil.which("debootstrap"):
            pytest.skip(f"no base image {BASE} and no root/debootstrap to build it with docker/build-base.sh")
        subprocess.run([str(REPO / "docker/build-base.sh"), BASE], check=True, timeout=900)
    # What the build gets beyond the checkout: a CPU torch wheel and this host's CA bundle (pip inside the build
    # then trusts what the host trusts, a TLS-intercepting proxy included). Only files made here are removed.
    made = []
    try:
        made.append(torch_wheel(REPO / "docker/wheels"))
        extra = made[0].stat().st_size
        bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        if bundle and Path(bundle).is_file():
            made.append(REPO / "docker/certs/test-host-bundle.crt")
            shutil.copyfile(bundle, made[-1])
            extra += made[-1].stat().st_size
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: Debian's daemon has no buildx
        built = subprocess.run(["docker", "build", "--network", "host", "--build-arg", f"BASE={BASE}", "-t", TAG,
                                str(REPO)], capture_output=True, text=True, timeout=1500, env=env)
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    # The checkout after set-up (.venv, .git, caches) is mostly left out by .dockerignore.
    assert context_mb(built.stdout) - extra / 1e6 < 200, built.stdout[:400]
    return TAG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_is_starting_until_ready_then_serves_and_stops_cleanly(image):
    port = free_port()
    cid = docker("run", "-d", "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8000", image).stdout.strip()
    base, samples = f"http://127.0.0.1:{port}", []
    try:
        assert docker("inspect", "-f", "{{.Config.User}}", cid).stdout.strip() == "diffuserve"
        end = time.monotonic() + 600
        while time.monotonic() < end:
            # Health first, then /ready: a "healthy" seen before a not-ready answer would mean Docker called the
            # container healthy before it was ready (/ready never goes back to 503 until a drain).
            health = docker("inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()
            try:
                ready = httpx.get(base + "/ready", timeout=5).status_code
            except httpx.HTTPError:
                ready = 0
            samples.append((health, ready))
            if health == "healthy":
                break
            assert health == "starting", samples[-10:]
            time.sleep(0.3)
        assert samples[-1] == ("healthy", 200), samples[-10:]
        assert all(r == 200 for h, r in samples if h == "healthy")
        assert any(h == "starting" and r != 200 for h, r in samples), samples[:10]  # seen starting while not ready
        r = httpx.post(base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 8}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        docker("stop", cid, timeout=120)
        state = json.loads(docker("inspect", "-f", "{{json .State}}", cid).stdout)
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # drained, not killed at Docker's 10 s
    finally:
        done = docker("logs", cid, check=False)
        logs = done.stdout + done.stderr
        docker("rm", "-f", cid, check=False)
    assert "Traceback" not in logs, logs[-2000:]
