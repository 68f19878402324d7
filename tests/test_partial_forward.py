"""The partial forward (a subset of rows against cached K/V) computes exactly what a full forward computes."""

from __future__ import annotations

import pytest
import torch

from conftest import PARITY, small_spec
from diffuserve.engine.model import ForwardBatch, load_model
from diffuserve.engine.model.saver import random_model

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 round-off; a wrong key, position or mask is off by >> 1e-3


def _ids(n: int, vocab: int = 290, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rows_against_cache_equal_full_forward(family):
    model = random_model(small_spec(family), seed=2, dtype=torch.float64)
    ids = _ids(40)
    full = model.logits(ids)  # [1, 40, V]
    cache = model.new_cache(1, 40)
    pos = torch.arange(40)[None]
    model.forward(ForwardBatch(ids=ids, positions=pos, cache=cache, key_len=40))
    rows = torch.tensor([[3, 17, 18, 39]])  # non-contiguous positions
    part = model.forward(ForwardBatch(ids=ids[:, rows[0]], positions=rows, cache=cache, key_len=40))
    torch.testing.assert_close(part, full[:, rows[0]], **TOL)
    assert not torch.allclose(part[0, 0], full[0, 4]), "rows must really differ from one another"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_key_subset_equals_forward_of_that_subsequence(family):
    """Attending to a subset S of cached keys == a full forward of just the tokens in S at their true positions."""
    model = random_model(small_spec(family), seed=3, dtype=torch.float64)
    ids = _ids(50, seed=1)
    S = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 14, 30, 49])  # prefix, a window, a far tail position
    sub = model.forward(ForwardBatch(ids=ids[:, S], positions=S[None]))  # no cache: attend among S only
    cache = model.new_cache(1, 50)
    model.forward(ForwardBatch(ids=ids[:, S], positions=S[None], cache=cache, keys=S[None]))
    q = torch.tensor([[11, 12, 49]])
    part = model.forward(ForwardBatch(ids=ids[:, q[0]], positions=q, cache=cache, keys=S[None]))
    where = torch.tensor([5, 6, 10])  # the rows of q inside S
    torch.testing.assert_close(part, sub[:, where], **TOL)
    # Changing a far-field token that is not in S changes nothing; changing one in S does.
    ids2 = ids.clone()
    ids2[0, 40] = (ids2[0, 40] + 1) % 290
    again = model.forward(ForwardBatch(ids=ids2[:, q[0]], positions=q, cache=cache, keys=S[None]))
    torch.testing.assert_close(again, part, rtol=0, atol=0)


def test_logits_rows_select_only_those_rows():
    model = random_model(small_spec("llada"), seed=4, dtype=torch.float64)
    ids = _ids(20, seed=2)
    full = model.logits(ids)
    pick = torch.tensor([[5, 0, 19]])
    out = model.forward(ForwardBatch(ids=ids, positions=torch.arange(20)[None], logits_rows=pick))
    assert out.shape == (1, 3, model.spec.vocab_size)
    torch.testing.assert_close(out, full[:, pick[0]], **TOL)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_ragged_batch_equals_separate_calls(family):
    """Two requests' different row sets and key sets, padded into one call, give each request's own result."""
    model = random_model(small_spec(family), seed=5, dtype=torch.float64)
    a, b = _ids(30, seed=3), _ids(30, seed=4)
    cache = model.new_cache(2, 30)
    pos = torch.arange(30)[None].expand(2, -1)
    model.forward(ForwardBatch(ids=torch.cat([a, b]), positions=pos, cache=cache, key_len=30))
    solo = []
    for x, rows, keys in ((a, [4, 9], list(range(20))), (b, [1, 2, 25], list(range(10)) + [25, 29])):
        c1 = model.new_cache(1, 30)
        model.forward(ForwardBatch(ids=x, positions=torch.arange(30)[None], cache=c1, key_len=30))
        r, k = torch.tensor([rows]), torch.tensor([keys])
        solo.append(model.forward(ForwardBatch(ids=x[:, r[0]], positions=r, cache=c1, keys=k))[0])
    # Pad row sets to 3 and key sets to 20; padded keys are masked out, padded rows write to the scratch slot.
    rows = torch.tensor([[4, 9, 0], [1, 2, 25]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    keys = torch.tensor([list(range(20)), list(range(10)) + [25, 29] + [0] * 8])
    kmask = torch.tensor([[True] * 20, [True] * 12 + [False] * 8])
    ids = torch.stack([a[0, rows[0]], b[0, rows[1]]])
    before = [t[0, :, :30].clone() for t in cache.k]
    out = model.forward(ForwardBatch(ids=ids, positions=rows, cache=cache, keys=keys, valid=valid,
                                     attn_mask=kmask[:, None, None, :].expand(-1, 1, 3, -1)))
    torch.testing.assert_close(out[0, :2], solo[0], **TOL)
    torch.testing.assert_close(out[1], solo[1], **TOL)
    # The padded row of request a (position 0) went to the scratch slot: a's slot 0 is untouched.
    for layer, old in enumerate(before):
        assert torch.equal(cache.k[layer][0, :, 0], old[:, 0])
    assert not torch.equal(cache.k[1][0, :, 30], torch.zeros_like(cache.k[1][0, :, 30]))


def test_parity_checkpoint_partial_forward_float64():
    """The same property on a published-layout checkpoint (bf16 weights run in float64)."""
    model = load_model(PARITY / "dream-tiny" / "model", torch.float64)
    ids = torch.tensor([[151644, 872, 198, 1023, 1007, 1000, 1059, 151645, 198] + [151666] * 16])
    full = model.logits(ids)
    cache = model.new_cache(1, ids.shape[1])
    model.forward(ForwardBatch(ids=ids, positions=torch.arange(ids.shape[1])[None], cache=cache, key_len=25))
    rows = torch.tensor([[8, 9, 10, 24]])
    part = model.forward(ForwardBatch(ids=ids[:, rows[0]], positions=rows, cache=cache, key_len=25))
    torch.testing.assert_close(part, full[:, rows[0]], **TOL)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("group_cost", [0, 4, 10**6])  # a group per row count, {2, 3} + {20}, one for all
def test_runner_ragged_batch_equals_each_request_alone(family, group_cost):
    """The engine's packed layout (rows back to back, K/V written straight to the pool, attention in groups of
    similar row counts) gives every request the logits of its own partial forward."""
    import numpy as np

    import diffuserve.engine.runner as runner_mod
    from diffuserve.engine.decoding.step import StepPlan, segment
    from diffuserve.engine.model.kv_pool import KVPool

    model = random_model(small_spec(family), seed=6, dtype=torch.float64)
    pool = KVPool.for_requests(model, [30, 30, 30], page_size=8)
    runner = runner_mod.ModelRunner(model, pool, group_cost=group_cost)
    xs = [_ids(30, seed=s)[0] for s in (7, 8, 9)]
    handles = [pool.allocate(30) for _ in xs]
    every = np.arange(30)
    # every slot written: one forward of the whole canvas each, no logits read
    runner.step([(h, StepPlan([segment(x, every, every, canvas=30, logits_rows=every[:0])]))
                 for x, h in zip(xs, handles)])
    shapes = [(np.array([4, 9]), np.arange(20), np.array([1])),
              (np.array([1, 2, 25]), np.array(list(range(10)) + [25, 29]), np.array([0, 2])),
              (np.arange(5, 25), np.arange(30), np.array([0, 7, 19]))]
    plans = [StepPlan([segment(x.numpy()[pos], pos, keys, canvas=30, logits_rows=rows, greedy=True)])
             for x, (pos, keys, rows) in zip(xs, shapes)]
    fb = runner._pack_ragged([runner_mod._Segment(p.segments[0], h.slot_map) for p, h in zip(plans, handles)])
    assert len(fb.ragged.groups) == {0: 3, 4: 2, 10**6: 1}[group_cost]
    out, stats = runner.step(list(zip(handles, plans)))
    assert stats.rows == 2 + 3 + 20
    for x, (pos, keys, rows), got in zip(xs, shapes, out):
        cache = model.new_cache(1, 30)
        model.forward(ForwardBatch(ids=x[None], positions=torch.arange(30)[None], cache=cache, key_len=30))
        pos, keys = torch.from_numpy(pos), torch.from_numpy(keys)
        want = model.forward(ForwardBatch(ids=x[pos][None], positions=pos[None], cache=cache,
                                          keys=keys[None]))[0, torch.from_numpy(rows)]
        torch.testing.assert_close(got.rows[0].logits, want, **TOL)
        assert torch.equal(got.rows[0].greedy, want.argmax(-1))


def test_padded_row_counts_are_few_and_close():
    """The engine rounds its row count up so oneDNN meets few matmul shapes: never fewer rows, at most 12.5% more
    past 64 rows, 8 sizes per octave."""
    from diffuserve.engine.runner import padded_rows

    sizes = [padded_rows(n) for n in range(1, 4097)]
    assert all(p >= n for n, p in zip(range(1, 4097), sizes))
    assert all(p <= n * 1.125 for n, p in zip(range(64, 4097), sizes[63:]))
    assert len(set(sizes)) == 56
    assert padded_rows(padded_rows(300)) == padded_rows(300)


def test_kernel_warm_up_writes_only_the_scratch_slot():
    from diffuserve.engine.model.kv_pool import KVPool
    from diffuserve.engine.runner import ModelRunner, padded_rows

    model = random_model(small_spec("llada"), seed=6, dtype=torch.float64)
    pool = KVPool.for_requests(model, [30], page_size=8)
    runner = ModelRunner(model, pool)
    assert runner.warm_up(100) == len({padded_rows(n) for n in range(1, 101)})
    for t in pool.k + pool.v:
        assert not t[1:].any()  # slot 0 is the scratch slot
        assert t[0].any()
