"""From canvas to completion: cut at the first stop token, then at stop strings; usage counts what survives."""

from __future__ import annotations

from conftest import small_spec, write_tokenizer
from diffuserve.engine.detokenizer import apply_stop_strings, cut_at_stop, finish
from diffuserve.engine.model.tokenizer import load_tokenizer


def test_cut_at_stop_token_and_leftover_mask():
    assert cut_at_stop([5, 6, 9, 7, 9], (9,), 99) == ([5, 6], True)
    assert cut_at_stop([5, 99, 6], (9,), 99) == ([5], False)
    assert cut_at_stop([5, 6], (9,), 99) == ([5, 6], False)


def test_stop_strings_take_the_earliest():
    assert apply_stop_strings("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert apply_stop_strings("abc", ["x"]) == ("abc", False)


def test_finish_counts_only_tokens_before_the_stop_string(tmp_path):
    spec = small_spec("llada")
    write_tokenizer(tmp_path, spec)
    tok = load_tokenizer(tmp_path)
    ids = tok("the quick brown fox jumps")["input_ids"] + [spec.eos_id] * 5
    done = finish(ids, tok, spec.stop_ids, spec.mask_id)
    assert done.text == "the quick brown fox jumps" and done.finish_reason == "stop"
    assert spec.eos_id not in done.token_ids
    cut = finish(ids, tok, spec.stop_ids, spec.mask_id, stops=[" fox"])
    assert cut.text == "the quick brown" and cut.finish_reason == "stop"
    assert tok.decode(cut.token_ids) == "the quick brown"
    assert len(cut.token_ids) < len(done.token_ids)
    no_eos = finish(tok("hello world")["input_ids"], tok, spec.stop_ids, spec.mask_id)
    assert no_eos.finish_reason == "length"
