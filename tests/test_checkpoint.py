"""Checkpoints load the way real ones are published: sharded index, bf16, tokenizer files, chat template."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PARITY, small_spec, write_tokenizer
from diffuserve.engine.model import load_model, load_spec
from diffuserve.engine.model.saver import random_model, save_checkpoint
from diffuserve.engine.model.tokenizer import load_tokenizer


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_equals_unsharded(tmp_path, family):
    spec = small_spec(family)
    model = random_model(spec, seed=1)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    save_checkpoint(model, whole, torch.bfloat16)
    save_checkpoint(model, sharded, torch.bfloat16, max_shard_bytes=20_000)
    for d in (whole, sharded):
        write_tokenizer(d, spec)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3, "the test must really exercise several shards"
    assert not (sharded / "model.safetensors").exists()
    ids = torch.randint(0, 290, (2, 24), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a, b = load_model(whole, dtype), load_model(sharded, dtype)
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a.logits(ids), b.logits(ids))
    assert load_spec(sharded) == spec
    tok = load_tokenizer(sharded)
    text = "the quick brown fox"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|>hi\n<|assistant|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == spec.eos_id
    assert tok.convert_tokens_to_ids("<|mask|>") == spec.mask_id


def test_bf16_load_keeps_bf16_and_matches_weights():
    """Loading in bf16 casts tensor by tensor: every parameter is bf16 and bit-equal to the file."""
    from safetensors import safe_open

    model = load_model(PARITY / "llada-tiny" / "model", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with safe_open(str(PARITY / "llada-tiny" / "model" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.transformer.blocks.1.attn_out.weight"), model.layers[1].o_proj.weight)
        assert torch.equal(f.get_tensor("model.transformer.ff_out.weight"), model.lm_head.weight)


def test_published_specs_of_the_parity_checkpoints():
    llada = load_spec(PARITY / "llada-tiny" / "model")
    assert (llada.family, llada.mask_id, llada.eos_id, llada.eot_id, llada.num_kv_heads) == \
        ("llada", 126336, 126081, 126348, 4)
    assert not llada.shifted_logits
    dream = load_spec(PARITY / "dream-tiny" / "model")
    assert (dream.family, dream.mask_id, dream.eos_id, dream.num_kv_heads, dream.qkv_bias) == \
        ("dream", 151666, 151643, 2, True)
    assert dream.shifted_logits


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    spec = small_spec("llada")
    save_checkpoint(random_model(spec), tmp_path, torch.bfloat16)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.q_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load_model(tmp_path)


def test_tokenizer_of_a_named_fast_class_loads_without_the_model_type_warning():
    # AutoTokenizer reads config.json and warns on every load that model type `llada` is unknown to transformers.
    import subprocess
    import sys
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "models" / "tiny-text"
    code = ("from engine.model.tokenizer import load_tokenizer; t = load_tokenizer(%r); "
            "text = 'ROMEO.\\nO Juliet'; "
            "print(type(t).__name__, t.decode(t(text)['input_ids']) == text, t.chat_template is not None)" % str(tiny))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=tiny.parents[1])
    assert run.stdout.split()[1:] == ["True", "True"] and "model of type" not in run.stderr, run.stdout + run.stderr
