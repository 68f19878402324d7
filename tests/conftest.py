"""Shared fixtures: the parity checkpoints, small random specs, and a tokenizer built on the spot."""

from __future__ import annotations

import os

# The parity fixtures were produced where torch ran its AVX2 CPU kernels. Under AVX-512 a float32 reduction over
# Dream's 152k-token vocabulary rounds differently, which flips one near-tie (win-dream-g64-f32-r8-o32-i8-es, the
# reference itself flips the same way here). Pin the kernel level, before torch loads, so cases compare like with
# like; `diffuserve conformance` does the same (tools/cli.py).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import contextlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402

from diffuserve.engine.model import ModelSpec  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"


def small_spec(family: str, **changes) -> ModelSpec:
    base = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64,
                rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False, max_positions=256, mask_id=299,
                eos_id=298, pad_id=298, bos_id=297, eot_id=296)
    if family == "dream":
        base.update(num_kv_heads=2, qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6, eot_id=None, bos_id=298)
    base.update(changes)
    return ModelSpec(family=family, **base)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tokenizer(out: Path, spec: ModelSpec) -> None:
    """A tiny byte-level BPE with the spec's special ids, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_special_start = min(spec.mask_id, spec.eos_id, spec.bos_id or spec.eos_id, spec.eot_id or spec.eos_id)
    trainer = trainers.BpeTrainer(vocab_size=n_special_start, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world " * 20], trainer)
    names = {spec.eos_id: "<|endoftext|>", spec.mask_id: "<|mask|>"}
    if spec.bos_id is not None:
        names.setdefault(spec.bos_id, "<|startoftext|>")
    if spec.eot_id is not None:
        names.setdefault(spec.eot_id, "<|eot_id|>")
    filler = 0
    while tok.get_vocab_size() < min(names):
        tok.add_tokens([f"<unused{filler}>"])
        filler += 1
    for i in sorted(names):
        assert tok.get_vocab_size() == i, (tok.get_vocab_size(), i)
        tok.add_special_tokens([names[i]])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "chat_template": CHAT_TEMPLATE, "model_max_length": spec.max_positions}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path


# Only a start that hangs: the server says itself whether it is still starting (/health 200 "loading" or
# "warming"), and a warm-up on 2 cores kept busy by other work took 240 s where it takes 20 s idle.
START_TIMEOUT_S = 1800


def wait_until_ready(proc, base: str, on_state=None) -> float:
    """Poll /ready until 200 while the process lives (its exit fails at once); -> seconds waited. `on_state` gets
    each (health, ready) status pair as polled (0: no answer yet)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT_S:
        state = []
        for path in ("/health", "/ready"):
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    state.append(r.status)
            except urllib.error.HTTPError as exc:
                state.append(exc.code)
            except OSError:
                state.append(0)
        if on_state is not None:
            on_state(tuple(state))
        if state[1] == 200:
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise AssertionError(f"server exited with status {proc.returncode} while starting")
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {START_TIMEOUT_S} s")


@contextlib.contextmanager
def running_server(*serve_args: str, env: dict | None = None):
    """`diffuserve serve ARGS` as a real process on a free loopback port; yields its base URL once /ready
    answers 200 (loaded and warm), and stops it afterwards."""
    with server_process(*serve_args, env=env) as (_, base):
        yield base


@contextlib.contextmanager
def server_process(*serve_args: str, env: dict | None = None):
    """As running_server, yielding (process, base URL), for tests that signal the process themselves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: an unread pipe could fill and stall the server
    proc = subprocess.Popen([sys.executable, "-m", "diffuserve.tools.cli", "serve", *serve_args, "--port", str(port)],
                            cwd=FIXTURES.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(proc, base)
        except AssertionError as exc:
            log.seek(0)
            raise RuntimeError(f"server did not start ({exc}):\n{log.read()}") from None
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
