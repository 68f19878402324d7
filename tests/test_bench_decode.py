"""bench.decode's bookkeeping on the bundled text model: the counts its table reports are the real ones."""

from __future__ import annotations

import pytest

from bench import decode
from diffuserve.engine.model.bundled import bundled_names

pytestmark = pytest.mark.skipif("tiny-text" not in bundled_names(), reason="tiny-text is not in this checkout")


@pytest.fixture(scope="module")
def results():
    methods = ["vanilla", "fast_dllm_dual", "freecache", "window"]
    return {(d["method"], d["batch"]): d for d in decode.bench(["tiny-text"], [32], [1, 2], methods, n=2)}


def test_vanilla_is_the_baseline_and_computes_every_row_every_step(results):
    from diffuserve.engine.llm import LLM

    llm = LLM("tiny-text")
    prompt_len = len(decode.prompts_for(llm, "tiny-text", 1, 1)[0][0])
    for batch in (1, 2):
        v = results[("vanilla", batch)]
        assert v["speedup"] == 1.0
        assert v["forward_passes"] == 32 * (2 // batch)  # one token per step, 2 prompts in groups of `batch`
        assert v["query_rows"] == v["forward_passes"] * batch * (prompt_len + 32)


def test_cached_methods_compute_fewer_rows_and_every_row_is_reported(results):
    for (method, batch), d in results.items():
        assert d["tokens"] > 0 and d["tok_s"] > 0 and d["quality"] is None  # tiny-text has no checker
        assert d["rows_per_token"] == round(d["query_rows"] / d["tokens"], 2)
        if method != "vanilla":
            assert d["query_rows"] < results[("vanilla", batch)]["query_rows"], method


def test_the_table_has_a_line_per_row(results):
    md = decode.table(list(results.values()))
    assert md.count("\n") == len(results) + 1 and "`freecache`" in md and "rows / token" in md


def test_guided_is_skipped_without_a_verifier():
    assert decode.options_for("random-100m", "guided", 64) is None
    assert decode.options_for("tiny-text", "freecache", 64).threshold == 0.9


def test_window_overrides_apply_to_that_run_and_leave_the_method_table_alone():
    before = dict(decode.METHOD_OPTIONS["window"])
    opts = decode.options_for("tiny-text", "window", 64, decode.parse_options("threshold=0.5,active_tokens=3"))
    assert (opts.threshold, opts.active_tokens) == (0.5, 3)
    assert decode.METHOD_OPTIONS["window"] == before
    assert decode.options_for("tiny-text", "window", 64).threshold == before["threshold"] == 0.95


def test_sweep_measures_each_setting_and_fewer_active_tokens_compute_fewer_rows():
    from bench import sweep

    grid = sweep.settings([16], [2, 8], [8], gen=24)
    assert [(o.window_tokens, o.active_tokens, o.refresh_cycle) for o in grid] == [(16, 2, 8), (16, 8, 8)]
    rows = sweep.sweep("tiny-text", grid, batch=2, rounds=1, n=1, out=open("/dev/null", "w"))
    by_a = {d["A"]: d for d in rows}
    assert set(by_a) == {2, 8}
    for d in rows:
        assert d["c1_tok_s"] > 0 and abs(d["ratio"] - d["c2_tok_s"] / d["c1_tok_s"]) < 0.01
        assert 0 <= d["agreement"] <= 1 and d["elbo"] > 0
    assert by_a[2]["rows_per_token"] < by_a[8]["rows_per_token"]
    assert [d["c2_tok_s"] for d in rows] == sorted((d["c2_tok_s"] for d in rows), reverse=True)
    assert sweep.table(rows).count("\n") == len(rows) + 1


def test_vanilla_extrapolation_reports_the_full_runs_forwards_and_rows(monkeypatch):
    """--vanilla-forwards on the random-weight model: fewer whole-block steps are timed and scaled to the full step
    count, which is exact for forwards and rows because every vanilla forward computes the whole canvas."""
    small = dict(decode.RANDOM_100M, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    monkeypatch.setattr(decode, "RANDOM_100M", small)
    full, cut = (decode.bench(["random-100m"], [64], [1], ["vanilla"], n=1, out=open("/dev/null", "w"),
                              vanilla_forwards=k)[0] for k in (0, 8))
    assert full["extrapolated_from"] == 0 and cut["extrapolated_from"] == 8  # 2 blocks of 32: 4 steps each
    assert cut["forward_passes"] == full["forward_passes"] == 64
    assert cut["query_rows"] == full["query_rows"] == 64 * (32 + 64)
    assert "(timed 8 per group, scaled)" in decode.table([cut])


@pytest.mark.skipif("tiny-task" not in bundled_names(), reason="tiny-task is not in this checkout")
def test_task_prompts_alternate_tasks_in_equal_length_groups_that_fit_the_canvas():
    from diffuserve.engine.llm import LLM

    llm = LLM("tiny-task")
    for batch, n in ((1, 6), (4, 16)):
        prompts = decode.prompts_for(llm, "tiny-task", n, batch, 256)
        assert len(prompts) == n
        groups = [prompts[k:k + batch] for k in range(0, n, batch)]
        assert [g[0][1].task for g in groups] == ["count", "sentences"] * (len(groups) // 2)
        for g in groups:
            assert len({len(ids) for ids, _ in g}) == 1 and len({ex.task for _, ex in g}) == 1
        assert all(128 <= len(ex.answer) < 256 for _, ex in prompts)
    row = decode.Row("tiny-task", 256, 1, "vanilla")
    (_, count), (_, sentences) = decode.prompts_for(llm, "tiny-task", 2, 1, 256)
    for ex in (count, sentences):
        decode.tally(row, len(ex.answer), " ".join(ex.answer), ex)
    decode.tally(row, 3, "w0 x0 y0", sentences)
    assert row.per_task == {"count": [1, 1], "sentences": [1, 2]} and (row.correct, row.checked) == (2, 3)
    assert "(count 1/1, sentences 1/2)" in decode.table([row.as_dict(None)])


def test_window_options_parse_with_their_field_types():
    assert decode.parse_options("threshold=0.9,active_tokens=8,refresh=full") == dict(
        threshold=0.9, active_tokens=8, refresh="full")
