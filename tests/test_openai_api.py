"""The HTTP API through the official `openai` SDK and raw SSE, against a real server on the bundled tiny-text."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import running_server

KEY = "sekret"


@pytest.fixture(scope="module")
def base():
    with running_server("--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-text"]
    assert client.models.retrieve("tiny-text").id == "tiny-text"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_and_its_stream_agree(client):
    kw = dict(model="tiny-text", prompt="ROMEO.\n", max_tokens=32, temperature=0.8, seed=11)
    full = client.completions.create(**kw)
    c = full.choices[0]
    assert c.finish_reason in ("stop", "length") and isinstance(c.text, str) and c.text
    assert full.usage.prompt_tokens == 6 and 0 < full.usage.completion_tokens <= 32
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True) if ch.choices)
    assert streamed == c.text


def test_chat_and_its_stream_agree(client):
    kw = dict(model="tiny-text", messages=[{"role": "user", "content": "Now is the winter of our discontent"}],
              max_tokens=32, seed=3)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.object == "chat.completion"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model="tiny-text", prompt="KING LEAR.\n", max_tokens=24, temperature=1.0, n=3)
    a = client.completions.create(**kw, seed=5)
    b = client.completions.create(**kw, seed=5)
    other = client.completions.create(**kw, seed=6)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.text for c in a.choices] != [c.text for c in other.choices]
    assert len({c.text for c in a.choices}) > 1  # the choices are separate samples
    one = client.completions.create(**{**kw, "n": 1}, seed=5)
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, not once per choice
    assert a.usage.completion_tokens > 24  # the three choices' tokens add up


def test_stop_string_is_removed_and_counted(client):
    free = client.completions.create(model="tiny-text", prompt="ROMEO.\n", max_tokens=48, seed=0)
    text = free.choices[0].text
    assert "." in text, text
    cut = client.completions.create(model="tiny-text", prompt="ROMEO.\n", max_tokens=48, seed=0, stop=["."])
    assert cut.choices[0].text == text[: text.index(".")]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < free.usage.completion_tokens


def test_token_id_prompts_echo_and_logprobs(client):
    # echo + logprobs scores the prompt (its tokens' ELBO shares; the first is null, as OpenAI's) and generates at
    # most one token; more is a 400 that says so.
    out = client.completions.create(model="tiny-text", prompt=[[1, 200, 300], [1, 400]], max_tokens=1, echo=True,
                                    logprobs=1, seed=0)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.prompt_tokens == 5
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 + 1 and lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-text", prompt=[[1, 200, 300]], max_tokens=8, echo=True, logprobs=1)
    assert e.value.body["param"] == "max_tokens"
    plain = client.completions.create(model="tiny-text", prompt=[[1, 200, 300]], max_tokens=8, echo=True, seed=0)
    assert plain.usage.completion_tokens == 8


def test_errors_surface_as_sdk_exceptions(base, client):
    bad_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model="tiny-text", prompt="x", max_tokens=4)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-text", prompt="x", max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-text", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"


# -- strict SSE ---------------------------------------------------------------------------------------------------

def _events(base: str, path: str, body: dict) -> list:
    with httpx.stream("POST", base + path, json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    out = []
    for f in frames[:-1]:
        assert f.startswith("data: ") and "\n" not in f, repr(f)  # exactly one data line per event
        payload = f[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out.count("[DONE]") == 1 and out[-1] == "[DONE]"
    return out[:-1]


@pytest.mark.parametrize("chat", [False, True])
def test_sse_framing_is_strict_and_equals_the_plain_response(base, chat):
    body = {"model": "tiny-text", "max_tokens": 40, "n": 2, "temperature": 0.7, "seed": 9,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": "To be, or not to be"}]
    else:
        body["prompt"] = "JULIET.\nO Romeo,"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    events = _events(base, path, {**body, "stream": True})
    plain = httpx.post(base + path, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=120).json()
    texts, finishes, first = {0: "", 1: ""}, {0: [], 1: []}, {}
    for ev in events[:-1]:
        assert ev["object"] == ("chat.completion.chunk" if chat else "text_completion") and ev["usage"] is None
        for c in ev["choices"]:
            i = c["index"]
            if chat:
                first.setdefault(i, c["delta"])
                texts[i] += c["delta"].get("content") or ""
            else:
                texts[i] += c["text"]
            if c["finish_reason"] is not None:
                finishes[i].append(c["finish_reason"])
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    for i in (0, 1):
        assert len(finishes[i]) == 1, finishes
        if chat:
            assert first[i].get("role") == "assistant"
        want = plain["choices"][i]["message"]["content"] if chat else plain["choices"][i]["text"]
        assert texts[i] == want
        assert finishes[i][0] == plain["choices"][i]["finish_reason"]
