"""`diffuserve prune`: the masks, the calibration statistics, and a pruned checkpoint that loads and serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_spec, write_tokenizer
from diffuserve.engine.model.saver import random_model, save_checkpoint
from diffuserve.tools.prune import (PruneConfig, attention_probs, calibrate, measured_sparsity, prunable, prune_mask,
                                    run)

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog, and hello world again. " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    spec = small_spec("llada")
    save_checkpoint(random_model(spec, seed=3), d, torch.bfloat16)
    write_tokenizer(d, spec)
    (d / "calib.txt").write_text(TEXT)
    return d


def test_unstructured_mask_drops_each_rows_lowest_scores():
    score = torch.rand(8, 40, generator=torch.Generator().manual_seed(0))
    keep = prune_mask(score, 0.25, "unstructured")
    assert (keep.sum(1) == 30).all()
    for row, k in zip(score, keep):
        assert row[~k].max() < row[k].min()


def test_two_four_keeps_the_top_two_of_every_four():
    score = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    keep = prune_mask(score, 0.5, "2:4").view(6, 4, 4)
    groups = score.view(6, 4, 4)
    assert (keep.sum(-1) == 2).all()
    assert (groups.masked_fill(~keep, -1).max(-1).values >= groups.masked_fill(keep, -1).max(-1).values).all()


def test_attention_probs_reproduce_the_layers_attention(model_dir):
    """The sink mass is computed from the same attention the forward uses: probs @ v is o_proj's input."""
    from diffuserve.tools.prune import load

    model = load(model_dir)
    seen = {}
    layer = model.layers[1]
    hooks = [layer.q_proj.register_forward_hook(lambda m, a, y: seen.__setitem__("q", y)),
             layer.k_proj.register_forward_hook(lambda m, a, y: seen.__setitem__("k", y)),
             layer.v_proj.register_forward_hook(lambda m, a, y: seen.__setitem__("v", y)),
             layer.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))]
    ids = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.logits(ids)
    for h in hooks:
        h.remove()
    s = model.spec
    probs = attention_probs(model, seen["q"], seen["k"], torch.arange(12).expand(2, -1))
    v = seen["v"].view(2, 12, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, heads, T, hd]
    out = (probs @ v).transpose(1, 2).reshape(2, 12, -1)
    assert torch.allclose(out, seen["o"], atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, s.num_heads, 12))


def test_wanda_statistic_is_the_input_feature_norm(model_dir):
    from diffuserve.tools.prune import load

    model = load(model_dir)
    ids = torch.randint(0, 290, (3, 10), generator=torch.Generator().manual_seed(2))
    region = torch.zeros_like(ids, dtype=torch.bool)  # nothing masked: the inputs are deterministic
    stats = calibrate(model, ids, region, "wanda")
    with torch.no_grad():
        x = model.layers[0].attn_norm(model.embed(ids)).double()  # q_proj's input
    want = (x.pow(2).sum(dim=(0, 1)) * 10).sqrt()  # 10 noise levels, all identical here
    assert torch.allclose(stats["layers.0.q_proj"].double(), want, rtol=1e-4)
    sink = calibrate(model, ids, region, "sink-aware")
    assert (sink["layers.0.q_proj"] > 0).all() and not torch.allclose(sink["layers.0.q_proj"], stats["layers.0.q_proj"])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sink-aware"])
def test_pruned_checkpoint_has_the_sparsity_and_serves(model_dir, tmp_path, method):
    from diffuserve.engine.llm import LLM

    cfg = PruneConfig(sparsity=0.5, method=method, samples=4)
    report = run(model_dir, tmp_path / "pruned", cfg, calib=str(model_dir / "calib.txt"))
    assert report["measured_sparsity"] == 0.5 and report["min_layer_sparsity"] == 0.5
    assert set(report["heldout_after"]) == {"masked_token_accuracy", "elbo_nats_per_token"}
    llm = LLM(str(tmp_path / "pruned"))
    assert measured_sparsity(llm.model) == 0.5
    dense = dict(prunable(LLM(str(model_dir)).model))
    for name, lin in prunable(llm.model).items():  # embeddings and head untouched, kept weights unchanged
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], dense[name].weight[kept])
    assert torch.equal(llm.model.lm_head.weight, LLM(str(model_dir)).model.lm_head.weight)
    out = llm.generate(llm.encode("the quick"), "llada", dict(gen_length=16, steps=16), seed=0)
    assert len(out.canvas_ids) == 16


def test_cli_two_four(model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffuserve.tools.cli", "prune", "--model", str(model_dir), "--out",
                          str(tmp_path / "p24"), "--method", "wanda", "--structure", "2:4", "--samples", "2",
                          "--calib", str(model_dir / "calib.txt"), "--quality-n", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["measured_sparsity"] == 0.5
    assert json.loads((tmp_path / "p24" / "prune_report.json").read_text()) == report
    from diffuserve.tools.prune import load

    for lin in prunable(load(tmp_path / "p24")).values():
        assert ((lin.weight != 0).view(lin.out_features, -1, 4).sum(-1) == 2).all()
    bad = subprocess.run([sys.executable, "-m", "diffuserve.tools.cli", "prune", "--model", str(model_dir), "--out",
                          str(tmp_path / "x"), "--structure", "2:4", "--sparsity", "0.3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "2:4 structure means exactly 50% sparsity" in bad.stderr
