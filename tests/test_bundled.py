"""The bundled models load from the repository by name, without network access, and answer sensibly."""

from __future__ import annotations

import json
import re

import pytest

from conftest import running_server
from diffuserve.engine.model.bundled import MODELS_DIR, bundled_names, resolve_model

pytestmark = pytest.mark.skipif("tiny-text" not in bundled_names(), reason="tiny-text is not in this checkout")


@pytest.fixture(scope="module")
def text_llm():
    from diffuserve.engine.llm import LLM

    return LLM("tiny-text")


def test_default_model_is_tiny_text():
    assert resolve_model(None) == str(MODELS_DIR / "tiny-text")


def test_tiny_text_card_and_size():
    d = MODELS_DIR / "tiny-text"
    card = (d / "README.md").read_text()
    assert "diffuserve train text" in card and "Wall time" in card
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total < 40e6, f"shipped model files are {total / 1e6:.1f} MB"
    assert json.loads((d / "config.json").read_text())["model_type"] == "llada"


def test_tiny_text_continues_in_the_corpus_style(text_llm):
    """Seeded continuations are made of words the corpus uses (not byte soup) and are deterministic."""
    vocab = set(re.findall(r"[a-z]+", (MODELS_DIR / "tiny-text" / "tokenizer.json").read_text().lower()))
    opts = dict(gen_length=48, steps=48, block_length=16)
    for prompt in ("ROMEO.\n", "KING.\nWhat news"):
        ids = text_llm.encode(prompt)
        a = text_llm.generate(ids, "llada", opts, seed=3)
        b = text_llm.generate(ids, "llada", opts, seed=3)
        assert a.canvas_ids == b.canvas_ids
        words = re.findall(r"[A-Za-z]+", a.completion.text)
        assert len(words) >= 8, a.completion.text
        known = sum(w.lower() in vocab for w in words) / len(words)
        assert known > 0.8, (known, a.completion.text)


def test_tiny_text_chat_answer_ends_with_eos(text_llm):
    ids = text_llm.encode("Now is the winter of our discontent", chat=True)
    out = text_llm.generate(ids, "llada", dict(gen_length=128, steps=128, block_length=32), seed=0)
    assert out.completion.finish_reason == "stop" and out.completion.text.strip()
    assert len(out.completion.token_ids) < 128


def test_serve_without_a_model_argument_answers_text(tmp_path):
    """`diffuserve serve` alone loads tiny-text from the checkout, offline, and completes a text prompt."""
    import os
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with running_server(env=env) as base:
        body = json.dumps({"prompt": "KING HENRY.\nWhat news from", "max_tokens": 32, "seed": 1}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["model"] == "tiny-text" and out["choices"][0]["text"].strip()
        assert 0 < out["usage"]["completion_tokens"] <= 32


@pytest.mark.skipif("tiny-text-ar" not in bundled_names(), reason="tiny-text-ar is not in this checkout")
def test_tiny_text_ar_verifies_tiny_text_drafts(text_llm):
    """The shipped verifier shares tiny-text's tokenizer, loads as a transformers causal LM, and guided decoding
    with it gives exactly its greedy continuation, at least one token per diffusion forward."""
    import torch

    from diffuserve.engine.model.causal import load_verifier

    ar = MODELS_DIR / "tiny-text-ar"
    assert (ar / "tokenizer.json").read_bytes() == (MODELS_DIR / "tiny-text" / "tokenizer.json").read_bytes()
    assert "diffuserve train text-ar" in (ar / "README.md").read_text()
    lm = load_verifier("tiny-text-ar").lm
    ids = text_llm.encode("KING HENRY.\nWhat news from")
    out = text_llm.generate(ids, "guided", dict(gen_length=48, verifier="tiny-text-ar"), seed=0)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(48):
            seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] == text_llm.spec.eos_id:
                break
    want = seq[len(ids):]
    assert out.canvas_ids[:len(want)] == want
    assert out.forward_calls <= len(want)
