"""The bundled tiny-task model: it loads by name, and answers seeded held-out-style task prompts correctly (exact
match for `count`, a valid parse for `sentences`), through the library and through `diffuserve generate --chat`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffuserve.engine.model.bundled import MODELS_DIR, bundled_names, resolve_model
from diffuserve.tools.train import task_data as tk

pytestmark = pytest.mark.skipif("tiny-task" not in bundled_names(), reason="tiny-task is not in this checkout")
ROOT = Path(__file__).resolve().parents[1]
VANILLA = dict(gen_length=256, steps=256, block_length=32)
PROMPT_41 = " ".join(["count", "down", "from", *tk.num(41)])  # "count down from w6 x1 y1 z2"


@pytest.fixture(scope="module")
def llm():
    from diffuserve.engine.llm import LLM

    return LLM("tiny-task")


def ask(llm, words: list[str], method: str = "llada", opts: dict = VANILLA, seed: int = 0) -> list[str]:
    ids = llm.encode(" ".join(words), chat=True)
    out = llm.generate(ids, method, opts, seed=seed)
    assert out.completion.finish_reason == "stop"  # the answer ends with EOS inside the canvas
    return out.completion.text.split()


def test_card_records_training_and_scores():
    card = (MODELS_DIR / "tiny-task" / "README.md").read_text()
    assert "diffuserve train task" in card and "Wall time" in card and "count exact_match" in card
    assert json.loads((MODELS_DIR / "tiny-task" / "config.json").read_text())["model_type"] == "llada"


@pytest.mark.parametrize("start", [41, 47, 36])  # A+1 numbers of 5 tokens: at most 50 fit 256
def test_count_answers_are_exact(llm, start):
    prompt = ["count", "down", "from", *tk.num(start)]
    answer = ask(llm, prompt)
    assert tk.check_count(prompt, answer), " ".join(answer)
    assert len(answer) >= 128


@pytest.mark.parametrize("n,seed", [(13, 0), (20, 1)])
def test_sentences_answers_parse(llm, n, seed):
    prompt = ["write", "sentences", "down", "from", *tk.num(n)]
    answer = ask(llm, prompt, seed=seed)
    assert tk.check_sentences(prompt, answer), " ".join(answer)
    assert len(answer) >= 128


def test_the_window_serving_mode_answers_too(llm):
    prompt = ["count", "down", "from", *tk.num(44)]
    answer = ask(llm, prompt, "window", dict(gen_length=256, steps=256))
    assert tk.check_count(prompt, answer), " ".join(answer)


def test_diffuserve_generate_answers_a_task_prompt():
    out = subprocess.run([sys.executable, "-m", "diffuserve.tools.cli", "generate", "--model", "tiny-task", "--chat",
                          "--prompt", PROMPT_41, "--gen-length", "256", "--steps", "256", "--block-length",
                          "32", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    assert tk.check_count(PROMPT_41.split(), data["text"].split()), data["text"]
    assert data["finish_reason"] == "stop"


def test_bench_quality_vanilla_decodes_in_blocks_of_32_by_default(capsys):
    """The done-when command `python -m bench.quality --model tiny-task --method vanilla --json` runs the decoder
    the card reports (blocks of 32), here on its first held-out example. (float32, where the command's default is the
    checkpoint's bf16: the suite pins torch's CPU kernels to AVX2, where bf16 matmuls are unsupported.)"""
    from bench.quality import main

    assert main(["--model", "tiny-task", "--method", "vanilla", "--n", "1", "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "llada" and report["options"]["block_length"] == 32
    (task, row), = report["tasks"].items()
    assert row["n"] == 1 and row["min_answer_tokens"] >= 128
    assert row["exact_match" if task in tk.DETERMINISTIC else "validity"] == 1.0
    assert report["generated_tokens"] >= 128


def test_auto_dtype_is_the_checkpoints_stored_dtype(monkeypatch):
    from diffuserve.engine.model.loader import resolve_dtype

    monkeypatch.setattr("diffuserve.engine.model.loader.native_bf16", lambda: True)
    assert resolve_dtype(resolve_model("tiny-task"), "auto") == torch.bfloat16  # config.json torch_dtype
    assert resolve_dtype(resolve_model("tiny-task"), "float32") == torch.float32


@pytest.mark.skipif("tiny-task-ar" not in bundled_names(), reason="tiny-task-ar is not in this checkout")
def test_tiny_task_ar_verifies_tiny_task_drafts(llm):
    """The shipped verifier shares tiny-task's token ids, loads as a transformers causal LM, and guided decoding
    with it is exactly its greedy continuation, which answers the count prompt right, in fewer diffusion forwards
    than tokens (the drafts are mostly accepted)."""
    from diffuserve.engine.model.causal import load_verifier

    ar = MODELS_DIR / "tiny-task-ar"
    assert (ar / "tokenizer.json").read_bytes() == (MODELS_DIR / "tiny-task" / "tokenizer.json").read_bytes()
    assert "diffuserve train task-ar" in (ar / "README.md").read_text()
    lm = load_verifier("tiny-task-ar").lm
    words = ["count", "down", "from", *tk.num(30)]
    ids = llm.encode(" ".join(words), chat=True)
    out = llm.generate(ids, "guided", dict(gen_length=256, verifier="tiny-task-ar"), seed=0)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(256):
            seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] == llm.spec.eos_id:
                break
    want = seq[len(ids):]
    assert out.canvas_ids[:len(want)] == want
    assert tk.check_count(words, out.completion.text.split()), out.completion.text
    assert out.forward_calls < len(want) / 2
