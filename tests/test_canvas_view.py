"""The live denoising view over the API (issue 32): `stream_options.include_canvas` adds each step's canvas events
to the stream; replayed from an all-mask canvas they give exactly the final canvas, for window, streaming_llada and
llada; and turning the view on changes no token. A real `diffuserve serve tiny-task` process."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import running_server

from diffuserve.engine.canvas import replay

PROMPT = "<|startoftext|><|user|>count down from w3 x1 y2<|assistant|>"  # 22, 21, ..., 1
MAX_TOKENS = 192


@pytest.fixture(scope="module")
def base():
    with running_server("tiny-task") as url:
        yield url


def stream(client: httpx.Client, body: dict) -> tuple[str, list[dict], str]:
    text, events, finish = [], [], None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                text.append(c["text"])
                events += c.get("canvas", [])
                finish = c["finish_reason"] or finish
    return "".join(text), events, finish


@pytest.mark.parametrize("method", ["window", "streaming_llada", "llada"])
def test_canvas_events_replay_to_the_final_canvas_and_change_no_token(base, method):
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "method": method, "seed": 3}
    with httpx.Client(base_url=base, timeout=600) as client:
        info = client.get("/tokenizer_info").json()
        mask = client.post("/tokenize", json={"prompt": info["mask_token"], "add_special_tokens": False}).json()
        mask_id = mask["tokens"][0]
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        streamed, none, _ = stream(client, body)
        viewed, events, finish = stream(client, {**body, "stream_options": {"include_canvas": True}})
        assert none == [] and viewed == streamed == plain and finish in ("stop", "length")
        canvas = replay(MAX_TOKENS, mask_id, events)
        assert mask_id not in canvas  # the last event leaves no mask
        eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
        cut = canvas[: canvas.index(eos["tokens"][0])] if eos["tokens"][0] in canvas else canvas
        assert client.post("/detokenize", json={"tokens": cut}).json()["prompt"].strip() == plain.strip()
        # the steps are numbered 1.. in order, each event well formed, and some showed masks still on the canvas
        assert [e["step"] for e in events] == list(range(1, len(events) + 1))
        assert any(e["masks"] > 0 for e in events[:-1]) and events[-1]["masks"] == 0
        assert all(e["rows"] > 0 and 0 < e["length"] <= MAX_TOKENS for e in events)
        committed = [c for e in events for c in e["committed"]]
        assert all(c[2] is None or 0 < c[2] <= 1 for c in committed)
        if method == "window":
            assert {"refresh", "pruned"} <= {e["phase"] for e in events}
            assert all(set(e["partition"]) == {"active", "buffer", "far"} for e in events)
            first = events[0]["partition"]
            assert first["active"] and first["far"]  # a 192-token canvas: the far field is not computed at first
        else:
            assert all("partition" not in e for e in events)
        full = stream(client, {**body, "stream_options": {"include_canvas": "full"}})[1]
        assert [e["canvas"] for e in full][-1] == canvas


def test_canvas_needs_a_stream(base):
    r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                   "stream_options": {"include_canvas": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
