"""lm-evaluation-harness (`local-completions`) against the real server on the bundled tiny-task.

Multiple choice: "the right next number of a count" against three wrong ones, scored through /v1/completions with
echo + logprobs (the prompt's shares of the Monte-Carlo ELBO, engine/decoding/score.py). Accuracy is far above
chance and every document's pick equals what the in-process estimator ranks; with the old response shape (logprobs
for the generated token only) lm-eval's own parser gives every choice 0 and the same task sits exactly at chance.

Generation: a count task through lm-eval with --apply_chat_template, once with the server's own tokenizer
(/tokenizer_info, /tokenize: no tokenizer path given) and once with the model directory's: the same scores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import running_server
from reliability.conftest import metric, scrape
from diffuserve.tools.train import task_data as tk

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is installed by scripts/setup.sh --test")
ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 24  # gold positions balanced: 6 at each of the 4 choices
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def base():
    with running_server("tiny-task") as url:
        yield url


def next_number_docs(llm) -> list[dict]:
    """Context: a count-down prompt in the chat template and the first m numbers of its answer; choices: the next
    number and three others, the right one at index i % 4."""
    rng, docs = random.Random(7), []
    for i in range(N_DOCS):
        n = rng.randint(8, 60)
        m = rng.randint(1, 5)
        said = " ".join(" ".join(tk.num(v)) + " ," for v in range(n, n - m, -1))
        prompt = llm.tokenizer.decode(llm.encode(" ".join(["count", "down", "from", *tk.num(n)]), chat=True))
        wrong = rng.sample([v for v in range(70) if v != n - m], 3)
        choices = [" ".join(tk.num(v)) for v in wrong]
        choices.insert(i % 4, " ".join(tk.num(n - m)))
        docs.append({"context": f"{prompt} {said}", "choices": choices, "gold": i % 4})
    return docs


def task_dir(tmp: Path, name: str, docs: list[dict], body: str) -> Path:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                      f"    test: {data}\ntest_split: test\n{body}")
    return tmp


def lm_eval(base: str, tasks: Path, name: str, out: Path, *extra: str, model_args: str = "",
            samples: bool = True) -> dict:
    args = f"model=tiny-task,base_url={base}/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=True"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args + model_args,
           "--tasks", name, "--include_path", str(tasks), "--output_path", str(out), *extra]
    done = subprocess.run(cmd + (["--log_samples"] if samples else []), env=ENV, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results,) = out.rglob("results_*.json")
    rows = []
    if samples:
        (log,) = out.rglob(f"samples_{name}_*.jsonl")
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {"results": json.loads(results.read_text())["results"][name], "samples": rows, "log": done.stderr}


def prompt_tokens(base: str) -> float:
    return metric(scrape(base), "diffuserve:prompt_tokens_total")


def test_multiple_choice_is_scored_by_the_elbo(base, tmp_path):
    from diffuserve.engine.decoding.score import SCORE, ScoreOptions
    from diffuserve.engine.llm import LLM
    from diffuserve.engine.offline import generate
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    llm = LLM("tiny-task")
    docs = next_number_docs(llm)
    tasks = task_dir(tmp_path, "tinytask_next", docs, "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
                     "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\ntarget_delimiter: ' '\n"
                     "metric_list:\n  - metric: acc\n")
    run = lm_eval(base, tasks, "tinytask_next", tmp_path / "out")
    assert "remote tokenizer" in run["log"].lower()  # discovered through /tokenizer_info
    acc = run["results"]["acc,none"]
    assert acc >= 0.75, acc  # chance is 0.25

    # The in-process estimator (the same engine step, one request at a time) ranks every document the same way.
    picks_http, picks_local = [], []
    for row in sorted(run["samples"], key=lambda r: r["doc_id"]):
        doc = docs[row["doc_id"]]
        scores_http = [float(resp[0][0]) for resp in row["resps"]]  # the sample log keeps strings
        ctx = llm.tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        local = []
        for choice in doc["choices"]:
            whole = llm.tokenizer(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            out = generate(llm.model, SCORE, torch.tensor([whole]), ScoreOptions(gen_length=1),
                           torch.Generator().manual_seed(1234))  # lm-eval's seed
            local.append(sum(out.info["prompt_logprobs"][len(ctx):]))
        assert scores_http == pytest.approx(local, abs=1e-6), (row["doc_id"], scores_http, local)
        picks_http.append(max(range(4), key=scores_http.__getitem__))
        picks_local.append(max(range(4), key=local.__getitem__))
    assert picks_http == picks_local
    assert acc == sum(p == d["gold"] for p, d in zip(picks_local, docs)) / len(docs)

    # Before: the server answered echo + logprobs with the generated token's logprob only. lm-eval's own parser
    # then gives every choice 0.0, picks the first, and this task (gold balanced over positions) is at chance.
    old_shape = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [-0.5], "top_logprobs": [{"x": -0.5}]}}]}
    (score, _), = LocalCompletionsAPI.parse_logprobs(old_shape, ctxlens=[10])
    assert score == 0
    before = sum(d["gold"] == 0 for d in docs) / len(docs)
    assert before == 0.25


def test_generation_with_the_servers_tokenizer_matches_the_local_one(base, tmp_path):
    docs = [{"question": " ".join(["count", "down", "from", *tk.num(n)]),
             "answer": " , ".join(" ".join(tk.num(v)) for v in range(n, -1, -1))} for n in (3, 4, 5, 6)]
    body = ("output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: ['<|eot|>']\n  max_gen_toks: 48\n"
            "metric_list:\n  - metric: exact_match\n")
    tasks = task_dir(tmp_path, "tinytask_count", docs, body)
    # lm-eval 0.4.13 cannot log samples whose chat prompt stayed a message list (remote tokenizer): results only;
    # the prompts' token counts on the server's /metrics show both runs sent the same prompts.
    t0 = prompt_tokens(base)
    remote = lm_eval(base, tasks, "tinytask_count", tmp_path / "remote", "--apply_chat_template", samples=False)
    t1 = prompt_tokens(base)
    local = lm_eval(base, tasks, "tinytask_count", tmp_path / "local", "--apply_chat_template", samples=False,
                    model_args=f",tokenizer_backend=huggingface,tokenizer={ROOT / 'models/tiny-task'}")
    t2 = prompt_tokens(base)
    assert "remote tokenizer" in remote["log"].lower()
    assert remote["results"] == local["results"]
    assert t1 - t0 == t2 - t1 > 0
    assert remote["results"]["exact_match,none"] >= 0.5  # the model answers these counts
