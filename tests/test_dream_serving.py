"""A Dream checkpoint served by `diffuserve serve` with its default method: batched, streamed, equal to the plain body.

dream-tiny is the Dream-layout parity checkpoint (tests/fixtures/parity/dream-tiny); it ships no tokenizer, so the
test gives it a word-level one over its whole vocabulary (token i is the word "t<i>"), written beside a copy.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import PARITY, running_server

N = 8


def _word_tokenizer(out, vocab: int, specials: dict[int, str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {specials.get(i, f"t{i}"): i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token=specials[min(specials)]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials.values()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": specials[min(specials)],
        "pad_token": specials[min(specials)]}))


@pytest.fixture(scope="module")
def dream_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("dream-tiny")
    src = PARITY / "dream-tiny" / "model"
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    _word_tokenizer(out, cfg["vocab_size"], {cfg["eos_token_id"]: "<|endoftext|>",
                                             cfg["mask_token_id"]: "<|mask|>"})
    return out


def _stream(client: httpx.Client, body: dict) -> str:
    text = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.extend(c["text"] for c in chunk["choices"])
    return "".join(text)


def _requests_per_step(metrics: str) -> tuple[float, float]:
    """(steps, steps that computed exactly one request) from /metrics."""
    total = one = 0.0
    for line in metrics.splitlines():
        if line.startswith("diffuserve:requests_per_step_count"):
            total = float(line.split()[-1])
        if line.startswith("diffuserve:requests_per_step_bucket") and 'le="1.0"' in line:
            one = float(line.split()[-1])
    return total, one


def test_dream_default_method_streams_batched_and_equals_the_plain_body(dream_tiny):
    # Token-id prompts of the parity cases: the checkpoint was fitted to answer those (elsewhere it writes EOS).
    cases = json.loads((PARITY / "dream-tiny" / "cases.json").read_text())["cases"]
    prompts = list(dict.fromkeys(tuple(c["prompt_ids"][0]) for c in cases if len(c["prompt_ids"]) == 1))[:N]
    bodies = [{"prompt": list(p), "max_tokens": 48, "seed": i} for i, p in enumerate(prompts)]
    with running_server(str(dream_tiny), "--dtype", "float32") as base, \
            httpx.Client(base_url=base, timeout=300) as client:
        with ThreadPoolExecutor(N) as pool:
            streamed = list(pool.map(lambda b: _stream(client, b), bodies))
        steps, single = _requests_per_step(client.get("/metrics").text)
        with ThreadPoolExecutor(N) as pool:
            plain = list(pool.map(lambda b: client.post("/v1/completions", json=b).json(), bodies))
        # top_k / top_p reach the Dream sampler that reads them; a method that does not is a 400 naming the field
        sampled = {**bodies[0], "method": "dream", "temperature": 1.0, "top_k": 5, "top_p": 0.9}
        assert client.post("/v1/completions", json=sampled).status_code == 200
        assert client.post("/v1/completions", json={**bodies[0], "top_k": -1}).status_code == 200  # vLLM's "off"
        window = client.post("/v1/completions", json={**bodies[0], "method": "window", "top_k": 5})
        assert window.status_code == 400 and window.json()["error"]["param"] == "top_k"
    assert steps > 0 and steps - single > 0, (steps, single)  # steps that computed more than one request
    for s, p in zip(streamed, plain):
        assert p["choices"][0]["text"] == s
    assert any(s for s in streamed)  # the model wrote something: the comparison is not of empty strings
