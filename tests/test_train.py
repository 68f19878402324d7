"""The training loop: the objective, resumption that continues exactly, and the published output layout."""

from __future__ import annotations

import pytest
import torch

from conftest import small_spec
from diffuserve.engine.model import load_model
from diffuserve.engine.model.saver import random_model, save_checkpoint
from diffuserve.tools.train import task_data as tk
from diffuserve.tools.train.objective import corrupt, elbo, masked_diffusion_loss
from diffuserve.tools.train.trainer import TrainConfig, train


def _batches(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 290, (4, 32), generator=g)
    region = torch.ones_like(ids, dtype=torch.bool)
    region[:, :8] = False  # a "prompt" outside the loss
    return ids, region


def test_corrupt_masks_only_the_region():
    ids, region = _batches(0)
    noisy, masked, p = corrupt(ids, region, 299, torch.Generator().manual_seed(0))
    assert not masked[:, :8].any() and (noisy[:, :8] == ids[:, :8]).all()
    assert (noisy[masked] == 299).all() and (noisy[~masked] == ids[~masked]).all()
    assert ((p > 0) & (p <= 1)).all()
    floor = torch.zeros(ids.shape)
    floor[:, 24:] = 1.0  # the "future" right of a block: always masked, whatever t is drawn
    noisy, masked, p = corrupt(ids, region, 299, torch.Generator().manual_seed(0), t=torch.zeros(4), floor=floor)
    assert masked[:, 24:].all() and (p[:, 24:] == 1).all() and not masked[:, :8].any()
    assert masked[:, 8:24].float().mean() < 0.1  # t = 0 elsewhere: almost nothing else is masked


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, capsys):
    spec = small_spec("llada")
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup=5, log_every=10, eval_every=1000, ckpt_every=15)
    fixed = _batches(0)
    straight = random_model(spec, seed=0)
    before = float(masked_diffusion_loss(straight, *fixed, torch.Generator().manual_seed(9)))
    train(straight, lambda s: fixed, cfg, tmp_path / "a")
    after = float(masked_diffusion_loss(straight, *fixed, torch.Generator().manual_seed(9)))
    assert after < 0.7 * before
    # Stop after step 15, resume to 30 in a fresh model: the weights equal the uninterrupted run's.
    resumed = random_model(spec, seed=0)
    train(resumed, lambda s: fixed, cfg, tmp_path / "b", until=15)
    again = random_model(spec, seed=0)
    train(again, lambda s: fixed, cfg, tmp_path / "b")
    assert "resumed at step 15/30" in capsys.readouterr().err
    for (n, p), (_, q) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_elbo_prefers_the_trained_data(tmp_path):
    spec = small_spec("llada")
    model = random_model(spec, seed=0)
    fixed = _batches(0)
    train(model, lambda s: fixed, TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup=5, log_every=100,
                                              eval_every=1000, ckpt_every=1000), tmp_path)
    other = _batches(1)
    assert float(elbo(model, *fixed).mean()) < float(elbo(model, *other).mean())
    save_checkpoint(model, tmp_path / "out", torch.bfloat16)
    assert load_model(tmp_path / "out").spec == spec


def test_task_checkers_accept_the_generated_answers_and_reject_corruptions():
    import random

    rng = random.Random(0)
    for name, make in tk.TASKS.items():
        for _ in range(20):
            ex = make(rng, 1023)
            assert tk.CHECKERS[name](ex.prompt, ex.answer)
            at = 0 if name == "count" else len(tk.PATTERN)  # a sentence's number follows its words and ":"
            assert ex.answer[at:at + tk.DIGITS] == ex.prompt[-tk.DIGITS:]  # the first number is the prompt's own
            assert not tk.CHECKERS[name](ex.prompt, ex.answer[:-1])
            bad = list(ex.answer)
            bad[len(bad) // 2] = "count"  # a word no answer may hold anywhere
            assert not tk.CHECKERS[name](ex.prompt, bad)
    assert tk.num(47) == ["w5", "x2", "y3", "z2"] and [tk.value(tk.num(k)) for k in range(420)] == list(range(420))
    assert tk.value(["x2", "w5", "y3", "z2"]) == -1 and tk.value(["0", "4", "7"]) == -1  # residues out of order, digits
    with pytest.raises(ValueError):
        tk.num(420)  # 420 would share its residues with 0
    assert not tk.check_count(["count", "down", "from", "0", "4", "7"], [])  # a malformed prompt has no right answer


def test_task_rows_start_with_the_prompt_and_continuation_rows_give_an_answer_prefix():
    """Every row is the chat prompt, then (continuation rows) a given prefix of the answer, then the noised region:
    the rest of the answer and EOS to the end. Only that region is in the loss."""
    import random

    batches = tk.TaskBatches(0, split=0.5)
    ids, region, floor = batches.rows(random.Random(1), 256, 96)
    assert ids.shape == region.shape == (96, batches.prompt_pad + 256)
    split_rows, wide_rows = [], 0
    for row, reg, fl in zip(ids.tolist(), region.tolist(), floor.tolist()):
        assert row[:2] == [tk.BOS, tk.USER]
        start = reg.index(True)
        assert all(reg[start:]) and not any(reg[:start])  # one contiguous region, to the end of the row
        if tk.EOS not in row:  # a cut row (WIDE): the answer is longer than the canvas (test_cut_rows_... below)
            wide_rows += 1
            continue
        words = [(tk.SPECIALS + tk.WORDS)[i] for i in row]
        assistant = words.index("<|assistant|>")
        prompt, rest = words[2:assistant], [w for w in words[assistant + 1:] if w != "<|endoftext|>"]
        task = "count" if prompt[0] == "count" else "sentences"
        assert tk.CHECKERS[task](prompt, rest)  # prefix + region together are one right answer
        assert not any(fl[:start + 1])  # the prompt, any given prefix and the first noised token have no floor
        cut = fl.index(1.0) if 1.0 in fl else len(fl)
        assert all(f == 1.0 for f in fl[cut:]) and (cut == len(fl) or cut - start <= batches.NEAR)  # then masked
        split_rows.append(cut < len(fl))
    assert 0.25 < wide_rows / 96 < 0.55  # WIDE = 0.4 of the rows show a longer answer than the canvas holds
    n = len(split_rows)
    assert n / 4 < sum(split_rows) < 3 * n / 4  # about half the rest are continuation rows, like a semi-AR block
    _, whole, no_floor = tk.TaskBatches(0, split=0.0).rows(random.Random(1), 256, 16)
    # the region starts right after the prompt: <bos> <user>, 3 or 4 words, the number, <assistant>
    assert all(row.tolist().index(True) in (6 + tk.DIGITS, 7 + tk.DIGITS) for row in whole)
    assert not no_floor.any()  # whole answers are noised uniformly


def test_a_causal_lm_trains_and_resumes_through_the_same_loop(tmp_path):
    """The guided verifiers' recipe: transformers' Llama (tied embeddings) through train(loss_fn=causal_loss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffuserve.tools.train.tiny_ar import causal_loss

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, tie_word_embeddings=True)
    fixed = _batches(0)
    tc = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=2, log_every=10, eval_every=1000, ckpt_every=10)
    torch.manual_seed(0)
    straight = LlamaForCausalLM(cfg)
    before = float(causal_loss(straight, *fixed))
    train(straight, lambda s: fixed, tc, tmp_path / "a", loss_fn=causal_loss)
    assert float(causal_loss(straight, *fixed)) < 0.7 * before
    torch.manual_seed(0)
    resumed = LlamaForCausalLM(cfg)
    train(resumed, lambda s: fixed, tc, tmp_path / "b", loss_fn=causal_loss, until=10)
    torch.manual_seed(1)
    resumed = LlamaForCausalLM(cfg)  # a fresh process: different initial weights, all restored from the checkpoint
    train(resumed, lambda s: fixed, tc, tmp_path / "b", loss_fn=causal_loss)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_heldout_set_is_fixed_long_and_alternates_tasks():
    a, b = tk.heldout(20), tk.heldout(20)
    assert a == b  # seeded: every method is scored on the same examples
    assert [ex.task for ex in a] == ["count", "sentences"] * 10
    assert all(128 <= len(ex.answer) <= 1023 and tk.CHECKERS[ex.task](ex.prompt, ex.answer) for ex in a)


def test_cut_rows_end_mid_answer_and_training_lengths_do_not_follow_the_canvas():
    """Cut rows (a pruned window's view): prompt, a given prefix of a right answer, then a noised part and an
    always-masked tail, and no EOS: the row's end is not the answer's end. Training answer lengths are uniform up
    to what the canvas holds, so the number of masks does not tell the model the length."""
    import random

    batches = tk.TaskBatches(0, split=0.5)
    ids, region, floor = batches.rows(random.Random(2), 128, 32, cut=True)
    words, firsts = tk.SPECIALS + tk.WORDS, 0
    for row, reg, fl in zip(ids.tolist(), region.tolist(), floor.tolist()):
        assert tk.EOS not in row and row[:2] == [tk.BOS, tk.USER]
        start = reg.index(True)
        first = start == row.index(tk.ASSISTANT) + 1  # FIRST: noised from the answer's first token on
        firsts += first
        assert all(reg[start:]) and 0 < len(row) - start and (first or len(row) - start <= batches.NEAR + batches.FAR)
        assert not any(fl[:start + 1]) and fl == sorted(fl)  # no floor, then (maybe) floor 1 to the end
        text = [words[i] for i in row]
        a = text.index("<|assistant|>")
        prompt, answer = text[2:a], text[a + 1:]
        n = tk.value(prompt[3:3 + tk.DIGITS] if prompt[0] == "count" else prompt[4:4 + tk.DIGITS])
        if prompt[0] == "count":
            want = [w for v in range(n, -1, -1) for w in tk.num(v) + [","]][:-1]
            assert answer == want[:len(answer)] and len(answer) < len(want)
        else:
            first = answer[len(tk.PATTERN):len(tk.PATTERN) + tk.DIGITS]  # the number after the words and ":"
            assert first == tk.num(n)[:len(first)] and len(answer) < (n + 1) * tk.SENTENCE
    assert 2 <= firsts <= 16  # FIRST = 0.25 of them
    rng = random.Random(0)
    counts = {len(tk.make_count(rng, 127, uniform=True).answer) for _ in range(200)}
    assert min(counts) < 40 and max(counts) == 128 // tk.NUMBER * tk.NUMBER - 1 and len(counts) > 15


def test_the_dream_layout_loss_reads_the_row_before_each_masked_position(tmp_path):
    """A Dream-layout model predicts position p from output row p - 1 (as the Dream methods decode): the training
    loss reads that row, not row p; and tiny-task's Dream layout survives save and load as itself."""
    import torch.nn.functional as F

    from diffuserve.tools.train.tiny_task import task_spec

    spec = small_spec("dream")
    model = random_model(spec, seed=0)
    ids, region = _batches(0)
    loss = masked_diffusion_loss(model, ids, region, torch.Generator().manual_seed(3))
    noisy, masked, p = corrupt(ids, region, spec.mask_id, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model.logits(noisy).float()  # [B, L, V]
    shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # [B, L, V]: row p - 1 at p
    for rows, same in ((shifted, True), (logits, False)):
        ce = F.cross_entropy(rows[masked], ids[masked], reduction="none") / p[masked]
        assert torch.allclose(loss.detach(), ce.sum() / region.sum(), rtol=1e-4) is same
    dream = task_spec("dream")
    assert dream.shifted_logits and not task_spec().shifted_logits
    save_checkpoint(random_model(dream, seed=0), tmp_path / "d", torch.bfloat16)
    assert load_model(tmp_path / "d").spec == dream
