"""Guided diffusion (`guided`): diffusion drafts verified by a causal LM. With deterministic verification every
committed token is the verifier's greedy choice, so the output is exactly the verifier's greedy continuation."""

from __future__ import annotations

import pytest
import torch

from conftest import small_spec
from diffuserve.engine import offline
from diffuserve.engine.model.saver import random_model

GEN = 48


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=298, bos_token_id=297)
    d = tmp_path_factory.mktemp("ar")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def dlm():
    return random_model(small_spec("llada"), seed=5)


def greedy(verifier_dir: str, prompt: list[int], n: int, eos: int) -> list[int]:
    """The verifier's own greedy continuation, one full forward per token (no cache), EOS-filled after EOS."""
    from diffuserve.engine.model.causal import load_verifier

    lm, seq, out = load_verifier(verifier_dir).lm, list(prompt), []
    with torch.no_grad():
        while len(out) < n:
            tok = int(lm(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(tok)
            out.append(tok)
            if tok == eos:
                return out + [eos] * (n - len(out))
    return out


@pytest.mark.parametrize("prompt", [[5, 17, 42], [200, 3, 3, 9, 120, 61, 7]])
def test_output_is_the_verifiers_greedy_path(dlm, verifier_dir, prompt):
    opts = dict(gen_length=GEN, verifier=verifier_dir, window_size=16)
    out = offline.generate(dlm, "guided", torch.tensor([prompt]), opts, None)
    assert out.ids[0].tolist() == greedy(verifier_dir, prompt, GEN, dlm.spec.eos_id)
    assert 1 <= out.forward_calls <= GEN


def test_right_drafts_are_accepted_in_chunks(dlm, verifier_dir, monkeypatch):
    """An oracle drafter (it proposes the verifier's own tokens): whole windows are accepted, so one diffusion
    forward per window and one verifier forward per 32-token chunk, instead of one per token."""
    prompt = [5, 17, 42]
    want = greedy(verifier_dir, prompt, GEN, dlm.spec.eos_id)
    if dlm.spec.eos_id in want:
        pytest.skip("the random verifier ended early")
    target = torch.tensor(prompt + want)
    forward = dlm.forward

    def oracle(fb):
        logits = forward(fb)  # the runner's packed layout: [M, V], row m at position positions[0, logits_rows[m]]
        pos = fb.positions[0, fb.ragged.logits_rows]
        return logits.scatter_add(-1, target[pos][..., None], torch.full_like(logits[..., :1], 1e4))

    monkeypatch.setattr(dlm, "forward", oracle)
    opts = dict(gen_length=GEN, verifier=verifier_dir, window_size=GEN)
    out = offline.generate(dlm, "guided", torch.tensor([prompt]), opts, None)
    assert out.ids[0].tolist() == want
    assert out.forward_calls == 1 and out.info["verifier_calls"] == -(-GEN // 32)


def test_a_verifier_is_required_and_must_share_the_vocabulary(dlm, verifier_dir):
    with pytest.raises(ValueError, match="needs a verifier"):
        offline.generate(dlm, "guided", torch.tensor([[1, 2]]), dict(gen_length=8), None)
    other = random_model(small_spec("llada", vocab_size=320, mask_id=319), seed=1)
    with pytest.raises(ValueError, match="vocabulary"):
        offline.generate(other, "guided", torch.tensor([[1, 2]]),
                         dict(gen_length=8, verifier=verifier_dir), None)
