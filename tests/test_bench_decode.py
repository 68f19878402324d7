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
    assert decode.options_for("tiny-text", "window", 64).threshold == before["threshold"] == 0.9


def test_sweep_measures_each_setting_and_fewer_active_tokens_compute_fewer_rows():
    from bench import sweep

    grid = sweep.settings(sweep.parse_grid("active_tokens=2,8,32"), gen=24, model="tiny-text",
                          base={"window_tokens": 16})
    assert [(o.window_tokens, o.active_tokens) for o in grid] == [(16, 2), (16, 8)]  # A > W is left out
    rows = sweep.sweep("tiny-text", grid, ["active_tokens"], batch=2, rounds=1, n=1, out=open("/dev/null", "w"))
    by_a = {d["active_tokens"]: d for d in rows}
    assert set(by_a) == {2, 8}
    for d in rows:
        # The table rounds tok/s to 0.1 and the ratio (of the unrounded rates) to 0.01: recomputed from the rounded
        # rates it may differ by up to what those roundings allow.
        slack = 0.005 + 0.05 * (1 + d["ratio"]) / (d["c1_tok_s"] - 0.05)
        assert d["c1_tok_s"] > 0 and abs(d["ratio"] - d["c2_tok_s"] / d["c1_tok_s"]) <= slack
        assert 0 <= d["agreement"] <= 1 and d["elbo"] > 0 and d["forwards"] > 0
    assert by_a[2]["rows_per_token"] < by_a[8]["rows_per_token"]
    assert [d["c1_tok_s"] for d in rows] == sorted((d["c1_tok_s"] for d in rows), reverse=True)
    assert sweep.table(rows).count("\n") == len(rows) + 1


@pytest.mark.skipif("tiny-task" not in bundled_names(), reason="tiny-task is not in this checkout")
def test_sweep_on_tiny_task_scores_answers_on_the_tune_set():
    from bench import sweep

    grid = sweep.settings(sweep.parse_grid("threshold=0.9"), gen=256)
    rows = sweep.sweep("tiny-task", grid, ["threshold"], batch=2, rounds=1, n=2, out=open("/dev/null", "w"))
    (d,) = rows
    assert d["threshold"] == 0.9 and d["right"].endswith("/2") and set(d) >= {"count", "sentences"}


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
    assert "(scaled from 8 steps per request)" in decode.table([cut])


def test_vanilla_extrapolation_works_on_a_tokenized_model_alone_and_batched():
    """--vanilla-forwards on every model: tiny-text, 32 tokens in one block, 8 steps timed instead of 32; alone, the
    forwards and rows are exactly the full run's; batched through the engine they scale the same way."""
    rows = decode.bench(["tiny-text"], [32], [1, 2], ["vanilla"], n=2, out=open("/dev/null", "w"), vanilla_forwards=8)
    alone, batched = sorted(rows, key=lambda d: d["batch"])
    assert alone["extrapolated_from"] == batched["extrapolated_from"] == 8
    assert alone["forward_passes"] == 2 * 32  # two prompts, 32 steps each, as if run in full
    assert batched["forward_passes"] <= 32 and batched["forward_passes"] % 4 == 0  # engine steps x 32 / 8
    assert alone["tokens"] > 0 and "(scaled from 8 steps per request)" in decode.table(rows)


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


@pytest.mark.skipif("tiny-task" not in bundled_names(), reason="tiny-task is not in this checkout")
def test_a_length_past_the_positions_decodes_the_longest_canvas_they_allow_and_the_prompt_sets_are_disjoint():
    from diffuserve.engine.llm import LLM

    llm = LLM("tiny-task")
    group = decode.prompts_for(llm, "tiny-task", 4, 1, 2048)
    longest = max(len(ids) for ids, _ in group)
    out = open("/dev/null", "w")
    fit = decode.fit_length(llm, "tiny-task", group, 2048, out)
    assert fit % decode.BLOCK == 0 and llm.spec.max_positions - longest - decode.BLOCK < fit <= 2048 - longest
    assert decode.fit_length(llm, "tiny-task", group, 1024, out) == 1024
    assert decode.fit_length(llm, "tiny-task", group, 8192, out) == 0  # not half of it fits: skipped
    row = decode.Row("tiny-task", 2016, 1, "window", asked_length=2048)
    assert "| tiny-task | 2048 -> 2016 | 1 |" in decode.table([row.as_dict(None)])
    report, tune = (decode.prompts_for(llm, "tiny-task", 16, 1, 1024, s) for s in ("report", "tune"))
    key = lambda ps: {tuple(ex.prompt) for _, ex in ps}  # noqa: E731
    assert len(report) == len(tune) == 16 and not key(report) & key(tune)


def test_window_options_parse_with_their_field_types():
    assert decode.parse_options("threshold=0.9,active_tokens=8,refresh=full") == dict(
        threshold=0.9, active_tokens=8, refresh="full")


def test_a_dream_model_runs_its_own_family_methods_and_skips_the_other_familys():
    """On a Dream-layout checkpoint vanilla is Dream's sampler (one block: --vanilla-forwards cuts its steps), the
    Dream block methods run with their table options, and LLaDA-only methods in the list are left out."""
    from conftest import PARITY

    path = str(PARITY / "dream-tiny" / "model")
    rows = decode.bench([path], [32], [1], ["vanilla", "fast_dllm_dual", "streaming_dream", "window"], n=1,
                        out=open("/dev/null", "w"), vanilla_forwards=8)
    by = {d["method"]: d for d in rows}
    assert set(by) == {"vanilla", "streaming_dream", "window"}
    assert by["vanilla"]["forward_passes"] == 32 and by["vanilla"]["extrapolated_from"] == 8
    assert 0 < by["streaming_dream"]["forward_passes"] < 32 and by["window"]["forward_passes"] > 0
    opts = decode.options_for(path, "vanilla", 32, family="dream")
    assert type(opts) is decode.METHODS["dream"].options and opts.n_steps == 32
