"""FreeCache (`freecache`): decoded K/V frozen and promoted at block end, never recomputed."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PARITY
from diffuserve.engine import offline
from diffuserve.engine.decoding.freecache import FreeCacheOptions
from diffuserve.engine.decoding.freecache import fill_after_eos
from diffuserve.engine.model import load_model


@pytest.fixture(scope="module")
def model():
    return load_model(PARITY / "llada-tiny" / "model", torch.float64)


def _prompt() -> torch.Tensor:
    cases = json.loads((PARITY / "llada-tiny" / "cases.json").read_text())["cases"]
    return torch.tensor([next(c["prompt_ids"][0] for c in cases if len(c["prompt_ids"]) == 1)])


def _recording(model, monkeypatch, boost: dict[int, int] | None = None) -> list[tuple[int, int]]:
    """Record (first position, rows) of every forward; `boost` {position: token} forces that token there.
    The engine's runner packs rows ([1, N], `Ragged`): N is padded and the logits are [M, V] for the rows named."""
    seen, forward = [], model.forward

    def spy(fb):
        seen.append((int(fb.positions[0, 0]), fb.positions.shape[1] - fb.ragged.pad))
        logits = forward(fb)
        rows = fb.positions[0, fb.ragged.logits_rows[: fb.ragged.logits_count]]  # [M] position of each logits row
        for pos, tok in (boost or {}).items():
            logits[..., tok] += 1e4 * (rows == pos)
        return logits

    monkeypatch.setattr(model, "forward", spy)
    return seen


def test_one_block_equals_fast_dllm_prefix(model):
    """With a single block there is nothing to promote: FreeCache is Fast-dLLM's prefix cache exactly."""
    opts = dict(gen_length=32, steps=32)
    want = offline.generate(model, "fast_dllm_prefix", _prompt(), opts, None)
    got = offline.generate(model, "freecache", _prompt(), opts, None)
    assert torch.equal(got.ids, want.ids) and got.forward_calls == want.forward_calls == 32


def test_only_the_first_forward_is_full_and_the_prefix_is_never_recomputed(model, monkeypatch):
    prompt = _prompt()
    lp, opts = prompt.shape[1], dict(gen_length=64, steps=32, block_length=16)
    seen = _recording(model, monkeypatch)
    out = offline.generate(model, "freecache", prompt, opts, None)
    assert seen[0] == (0, lp + 64)  # the one full forward
    assert out.forward_calls == len(seen) == 32  # the schedule's 8 steps per block, no refresh passes
    for k, (first, rows) in enumerate(seen[1:], start=1):
        block_start = lp + 16 * (k // 8)
        assert (first, rows) == (block_start, lp + 64 - block_start), f"forward {k} recomputed the frozen prefix"
    assert not (out.ids == model.spec.mask_id).any()
    # Fast-dLLM prefix cache takes as many passes, but each block starts with a full one.
    ours = sum(rows for _, rows in seen)
    seen.clear()
    offline.generate(model, "fast_dllm_prefix", prompt, opts, None)
    assert sum(rows for _, rows in seen) == ours + 3 * (lp + 64) - sum(lp + 64 - lp - 16 * b for b in range(1, 4))


def test_threshold_commits_in_parallel(model):
    opts = dict(gen_length=64, steps=64, block_length=16, threshold=0.05)
    out = offline.generate(model, "freecache", _prompt(), opts, None)
    assert out.forward_calls < 64 and not (out.ids == model.spec.mask_id).any()


def test_early_stop_fills_after_the_first_eos_and_stops(model, monkeypatch):
    prompt, eos = _prompt(), model.spec.eos_id
    lp = prompt.shape[1]
    opts = FreeCacheOptions(gen_length=64, steps=64, block_length=16)
    full = offline.generate(model, "freecache", prompt, opts, None)
    _recording(model, monkeypatch, boost={lp + 5: eos})
    out = offline.generate(model, "freecache", prompt, opts.with_(early_stop=True), None)
    assert out.ids[0, 5] == eos and (out.ids[0, 5:] == eos).all()
    assert not (out.ids == model.spec.mask_id).any()
    assert out.forward_calls <= 16 < full.forward_calls  # the first block only


def test_fill_after_eos_is_per_row():
    x = torch.tensor([[7, 7, 1, 9, 2, 9, 3], [7, 7, 1, 1, 1, 1, 1]])
    fill_after_eos(x, 2, eos=9)
    assert x.tolist() == [[7, 7, 1, 9, 9, 9, 9], [7, 7, 1, 1, 1, 1, 1]]
