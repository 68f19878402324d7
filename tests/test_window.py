"""diffuserve's Window-Diffusion serving mode (`window`): exactness properties and partition invariants."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PARITY
from diffuserve.engine import offline
from diffuserve.engine.decoding.window import WindowOptions
from diffuserve.engine.decoding.window import WindowDecoder, WindowPhase
from diffuserve.engine.model import ForwardBatch, load_model


@pytest.fixture(scope="module")
def model():
    return load_model(PARITY / "llada-tiny" / "model", torch.float64)


def _prompts(n: int) -> list[list[int]]:
    cases = json.loads((PARITY / "llada-tiny" / "cases.json").read_text())["cases"]
    return [c["prompt_ids"][0] for c in cases if len(c["prompt_ids"]) == 1][:n]


@pytest.mark.parametrize("refresh", ["full", "window"])
@pytest.mark.parametrize("gen_length,steps", [(32, 32), (64, 32)])
def test_covering_windows_and_r1_equal_vanilla(model, refresh, gen_length, steps):
    """W and A at least the canvas, R = 1: every step is a refresh, and the result is vanilla LLaDA's."""
    base = WindowOptions(gen_length=gen_length, steps=steps)
    wide = base.with_(window_tokens=10_000, active_tokens=10_000, refresh_cycle=1, refresh=refresh,
                      eos_early_exit=False)
    for p in _prompts(3):
        prompt = torch.tensor([p])
        want = offline.generate(model, "llada", prompt, {"gen_length": gen_length, "steps": steps},
                                torch.Generator().manual_seed(0))
        got = offline.generate(model, "window", prompt, wide, torch.Generator().manual_seed(0))
        assert torch.equal(got.ids, want.ids)
        assert got.forward_calls == want.forward_calls == steps and got.refresh_calls == steps


def test_commits_stay_in_the_first_active_masks_and_far_field_is_never_computed(model):
    opts = WindowOptions(gen_length=64, steps=64, window_tokens=12, active_tokens=3, refresh_cycle=4,
                         eos_early_exit=False)
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
    solo = offline.Solo(model, dec)
    refreshes = 0
    while dec.phase is not WindowPhase.DONE:
        first_a = set(dec.masks()[: dec.A].tolist())
        far = set(dec.masks()[dec.W:].tolist())
        seg = dec.plan().segments[0]
        assert not far & set(seg.positions.tolist()), "a far-field mask was computed"
        assert not far & set(seg.keys.tolist()), "a far-field mask was attended to"
        assert set(seg.positions.tolist()) <= set(seg.keys.tolist())
        refreshes += dec.phase is WindowPhase.REFRESH
        before = dec.x[0].clone()
        solo.step()
        changed = set((dec.x[0] != before).nonzero()[:, 0].tolist())
        assert changed and changed <= first_a, "committed outside the first A masks"
    assert refreshes == dec.refresh_calls >= 64 // 4


def test_window_refresh_leaves_fresh_kv_for_the_whole_window(model):
    """After a window refresh, every slot of the window holds exactly the K/V of a fresh forward of the window."""
    opts = WindowOptions(gen_length=48, steps=48, window_tokens=10, active_tokens=2, refresh_cycle=5)
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(2)[1:2]), opts, None)
    solo = offline.Solo(model, dec)
    for _ in range(7):  # a refresh, four pruned steps, the next refresh, one pruned step
        is_refresh = dec.phase is WindowPhase.REFRESH
        x_before = dec.x[0].clone()
        plan, _ = solo.step()
        if is_refresh and dec.step > 1:
            win = torch.from_numpy(plan.segments[0].positions)
            fresh = model.new_cache(1, dec.x.shape[1])
            model.forward(ForwardBatch(ids=x_before[win][None], positions=win[None], cache=fresh, keys=win[None]))
            for layer in range(model.spec.num_layers):
                k, v = solo.kv(layer, win.numpy())
                # fresh [1, kv_heads, N, hd] -> [T, kv_heads * hd], the pool's row layout
                want_k, want_v = (c[layer][0][:, win].transpose(0, 1).reshape(len(win), -1) for c in (fresh.k, fresh.v))
                torch.testing.assert_close(k, want_k, rtol=0, atol=0)
                torch.testing.assert_close(v, want_v, rtol=0, atol=0)


def test_eos_early_exit_fills_the_tail_and_stops(model):
    opts = WindowOptions(gen_length=64, steps=64, window_tokens=64, active_tokens=64, refresh_cycle=4,
                         threshold=0.5)
    for p in _prompts(4):
        out = offline.generate(model, "window", torch.tensor([p]), opts, torch.Generator().manual_seed(0))
        ids = out.ids[0].tolist()
        assert model.spec.mask_id not in ids
        if model.spec.eos_id in ids:
            first = ids.index(model.spec.eos_id)
            assert set(ids[first:]) == {model.spec.eos_id}
        assert out.forward_calls <= 64


@pytest.mark.parametrize("stall_steps", [1, 3, 4])
def test_with_a_threshold_a_stalled_frontier_commits_after_stall_steps(model, stall_steps):
    """Free choices (flat confidence) at the left must not wait while a sure token enters on the right every step:
    after `stall_steps` steps that commit none of the first FRONTIER masks, the most confident of them commits."""
    from diffuserve.engine.decoding.window import FRONTIER

    opts = WindowOptions(gen_length=32, threshold=0.9, stall_steps=stall_steps)
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
    plan = dec.plan().segments[0]
    first = dec.masks()[:FRONTIER]
    conf = torch.full((len(plan.logits_rows),), 0.1, dtype=torch.float64)
    conf[-1] = 1.0  # only the rightmost candidate is sure
    best_front = 2
    conf[best_front] = 0.3
    assert plan.positions[plan.logits_rows[:FRONTIER]].tolist() == first.tolist()
    chosen = dec._select(conf)
    assert chosen.nonzero()[:, 0].tolist() == [len(conf) - 1]
    for _ in range(stall_steps - 1):
        assert torch.equal(dec._keep_frontier_moving(conf, chosen), chosen)
    forced = dec._keep_frontier_moving(conf, chosen)
    assert forced.nonzero()[:, 0].tolist() == [best_front, len(conf) - 1]
    conf[0] = 0.95  # a sure frontier token commits by itself and resets the count
    assert torch.equal(dec._keep_frontier_moving(conf, dec._select(conf)), dec._select(conf))
    assert dec.stalled == 0


def test_fresh_once_computes_a_committed_token_in_the_next_step_only_and_buffer_refresh_leaves_decoded_kv(model):
    """fresh="once": a token committed in step t is a row of step t + 1 and of no later pruned step; a "buffer"
    refresh computes the first W masks and those not-yet-recomputed tokens, never the prompt or older decoded ones."""
    opts = WindowOptions(gen_length=64, steps=64, window_tokens=12, active_tokens=3, refresh_cycle=4,
                         eos_early_exit=False, fresh="once", refresh="buffer")
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
    solo = offline.Solo(model, dec)
    committed_at: dict[int, int] = {}  # position -> step it was committed in
    step, buffer_refreshes = 0, 0
    while dec.phase is not WindowPhase.DONE:
        refresh = dec.phase is WindowPhase.REFRESH
        first_w = set(dec.masks()[: dec.W].tolist())
        before = dec.x[0].clone()
        plan, _ = solo.step()
        rows = set(plan.segments[0].positions.tolist())
        decoded_rows = {p for p in rows if p in committed_at}
        assert all(committed_at[p] == step - 1 for p in decoded_rows), "a decoded token was recomputed again"
        assert decoded_rows == {p for p, s in committed_at.items() if s == step - 1}, "a commit was not recomputed"
        if refresh and step > 0:
            buffer_refreshes += 1
            assert rows == first_w | decoded_rows and not rows & set(range(dec.prompt_len))
        for p in (dec.x[0] != before).nonzero()[:, 0].tolist():
            committed_at[p] = step
        step += 1
    assert buffer_refreshes >= 64 // 4 - 1 and len(committed_at) == 64
    assert dec.done and not (dec.x == model.spec.mask_id).any()


def test_force_frontier_commits_the_best_of_the_first_masks_when_no_candidate_is_sure(model):
    """force="best" (Fast-dLLM's rule) commits the most confident candidate wherever it is; "frontier" the most
    confident of the first FRONTIER masks; a candidate reaching the threshold commits alone under either."""
    from diffuserve.engine.decoding.window import FRONTIER

    for force, want in (("best", 9), ("frontier", 1)):
        opts = WindowOptions(gen_length=32, threshold=0.9, active_tokens=16, force=force)
        dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
        dec.plan()
        conf = torch.full((len(dec.targets),), 0.1, dtype=torch.float64)
        conf[1], conf[9] = 0.3, 0.5  # a frontier mask, and a more confident one right of the frontier
        assert 9 >= FRONTIER and dec._pick(conf, frontier=True).tolist() == [want]
        conf[12] = 0.95
        assert dec._pick(conf, frontier=True).tolist() == [12]


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_span_keeps_candidates_and_commits_near_the_first_mask(model, threshold):
    """span S: the candidates (and so the commits) are the first A masks no further than S positions right of the
    first mask, even when the first A masks reach further (masks spread out as tokens commit to their right)."""
    opts = WindowOptions(gen_length=64, steps=64, active_tokens=16, span=6, threshold=threshold, eos_early_exit=False)
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
    solo = offline.Solo(model, dec)
    spread = 0
    while dec.phase is not WindowPhase.DONE:
        masks = dec.masks()
        near = set(masks[masks < masks[0] + 6].tolist())
        spread += masks[min(len(masks), 16) - 1] >= masks[0] + 6  # the first A masks reach past the span
        before = dec.x[0].clone()
        solo.step()
        assert set(dec.targets.tolist()) == near, "candidates are not the masks within the span"
        changed = set((dec.x[0] != before).nonzero()[:, 0].tolist())
        assert changed and changed <= near, "committed outside the span"
    assert spread > 10 and not (dec.x == model.spec.mask_id).any()


def test_stable_commits_each_runs_best_candidate_once_its_prediction_repeats(model):
    """stable=S: below the threshold, the most confident candidate of each run of adjacent masks (runs split by
    decoded tokens) commits once its predicted token has been the same S computations in a row; a changed
    prediction starts its count again; a sure candidate commits as always."""
    opts = WindowOptions(gen_length=32, threshold=0.9, active_tokens=16, force="frontier", stable=2)
    dec = WindowDecoder(model.spec, torch.tensor(_prompts(1)[:1]), opts, None)
    g = dec.prompt_len
    dec.xr[[g + 3, g + 7]] = 5  # decoded tokens split the first masks into runs [g, g+3), [g+4, g+7), [g+8, ...)
    dec._masks = None
    dec.plan()
    t = dec.targets.tolist()
    assert t[:8] == [g, g + 1, g + 2, g + 4, g + 5, g + 6, g + 8, g + 9] and len(t) == 16
    conf = torch.full((16,), 0.1, dtype=torch.float64)
    conf[t.index(g + 1)], conf[t.index(g + 5)], conf[t.index(g + 12)] = 0.3, 0.2, 0.25  # each run's best
    pred = torch.arange(16) + 10
    first = dec._pick(conf, pred=pred).tolist()
    assert first == [t.index(g + 1)]  # no repeat yet: the frontier's best alone (force="frontier")
    second = dec._pick(conf, pred=pred).tolist()
    assert second == [t.index(g + 1), t.index(g + 5), t.index(g + 12)]
    pred[t.index(g + 5)] = 99  # run 2's best changed its mind: it waits
    conf[t.index(g + 13)] = 0.95  # sure: commits by the threshold, and is now run 3's best (g + 12 is not)
    third = dec._pick(conf, pred=pred).tolist()
    assert third == [t.index(g + 1), t.index(g + 13)]
    assert dec._pick(conf, pred=pred).tolist() == [t.index(g + 1), t.index(g + 5), t.index(g + 13)]
