"""The commit-count and selection rules, checked against hand-computed values."""

from __future__ import annotations

import torch

from diffuserve.engine.decoding.sampling import (dream_commit_count, factor_select, gumbel_perturb, llada_schedule,
                                      sample_rows, sample_tokens, shift_logits, threshold_select, top_k_filter,
                                      top_p_filter)


def test_llada_schedule_spreads_the_remainder_first():
    masks = torch.ones(2, 10, dtype=torch.bool)
    masks[1, 7:] = False  # 7 masks
    counts = llada_schedule(masks, 4)
    assert counts.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]
    assert counts.sum(1).tolist() == [10, 7]


def test_threshold_takes_the_best_even_below_threshold():
    conf = torch.tensor([[0.2, -torch.inf, 0.5, 0.3], [0.95, 0.91, 0.2, -torch.inf]], dtype=torch.float64)
    chosen = threshold_select(conf, 0.9)
    assert chosen.tolist() == [[False, False, True, False], [True, True, False, False]]


def test_factor_rule():
    # thr_n = 1 - f/(n+1) with f = 1: rank 2 needs 0.667, rank 3 needs 0.75, rank 4 needs 0.8.
    conf = torch.tensor([[0.99, 0.7, 0.72, 0.1, -torch.inf]], dtype=torch.float64)
    # Sorted: 0.99, 0.72 (passes 0.667), 0.7 (fails 0.75) -> the two best, at indices 0 and 2.
    assert factor_select(conf, 1.0).tolist() == [[True, False, True, False, False]]
    # Nothing fails -> all candidates; the first failure at the last rank also commits all (the reference's quirk).
    assert factor_select(torch.tensor([[0.99, 0.9, 0.1]], dtype=torch.float64), 1.0).tolist() == [[True] * 3]


def test_dream_commit_count_floors_in_float32():
    t = torch.linspace(1, 1e-3, 257)
    counts = [dream_commit_count(torch.tensor(256 - i), 1, t[i + 1], t[i], i == 255) for i in range(3)]
    assert counts[0] == 0  # int(256 * 0.0039) == 0: the published quirk when steps == gen_length
    assert dream_commit_count(torch.tensor(5), 1, t[1], t[0], last=True) == 5


def test_gumbel_zero_temperature_is_identity_and_draws_nothing():
    logits = torch.randn(1, 3, 5)
    g = torch.Generator().manual_seed(0)
    assert gumbel_perturb(logits, 0.0, g) is logits
    assert torch.rand(1, generator=g).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()


def test_top_k_keeps_ties_and_uses_dtype_min():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    out = top_k_filter(logits, 1)
    assert out[0, 0] == 3.0 and out[0, 2] == 3.0 and out[0, 1] == torch.finfo(torch.float32).min


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    out = top_p_filter(logits, 0.1)
    assert out[0, 0] == 10.0 and (out[0, 1:] == torch.finfo(torch.float32).min).all()


def test_sample_tokens_confidences():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    conf, x0 = sample_tokens(logits)
    assert x0.item() == 0 and abs(conf.item() - 0.5) < 1e-12
    conf, _ = sample_tokens(logits, margin=True)
    assert abs(conf.item() - 0.2) < 1e-12
    conf, _ = sample_tokens(logits, neg_entropy=True)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert abs(conf.item() - float((p * torch.log(p + 1e-10)).sum())) < 1e-12


def test_shift_logits_duplicates_row_zero():
    logits = torch.arange(4.0).view(1, 4, 1)
    assert shift_logits(logits).flatten().tolist() == [0.0, 0.0, 1.0, 2.0]


def test_sample_rows_draws_softmax_over_temperature_and_never_a_banned_token():
    """Inverse-CDF draws: each row's frequencies follow softmax(logits / T) (T per row), the same law as the
    Gumbel-max draw; a token at BANNED_LOGIT never comes out, even at u = 0 or just below 1."""
    from diffuserve.engine.runner import BANNED_LOGIT

    logits = torch.tensor([[2.0, 1.0, 0.0, BANNED_LOGIT, -1.0], [BANNED_LOGIT, 0.5, 0.5, 3.0, BANNED_LOGIT]])
    temps = torch.tensor([0.7, 2.0])
    n = 40_000
    g = torch.Generator().manual_seed(3)
    rows, t = logits.repeat(n, 1), temps.repeat(n)  # [2n, V]: the two rows alternate
    tokens = sample_rows(rows, t, torch.rand(2 * n, dtype=torch.float64, generator=g)).view(n, 2)
    for r in range(2):
        want = torch.softmax(logits[r] / temps[r], -1)
        got = torch.bincount(tokens[:, r], minlength=5).double() / n
        assert got[want == 0].sum() == 0
        sd = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 5 * sd + 1e-12).all(), (got, want)
    edge = sample_rows(logits, temps, torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64))
    assert edge.tolist() == [0, 3]  # the first and the last token of positive probability
