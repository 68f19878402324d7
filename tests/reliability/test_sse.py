"""RELIABILITY.md B.4 #14: SSE framing, parsed strictly at the byte level, for completions and chat.

Every stream must be exactly a sequence of `data: <json>\\n\\n` frames ending with `data: [DONE]\\n\\n` and nothing
after; chat's first delta per choice carries role "assistant"; each choice gets exactly one non-null
finish_reason, and nothing after it; a usage chunk (choices = [], the non-streamed usage) comes last iff
stream_options.include_usage; and per choice the concatenated text equals the non-streamed response's text for the
same request (the FakeRunner is deterministic and temperature is 0), so no text was retracted or lost.
"""

from __future__ import annotations

import itertools
import json

import httpx

from .ledger import figure

C, CHAT = "/v1/completions", "/v1/chat/completions"


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def split_frames(raw: bytes) -> tuple[list[bytes], list[str]]:
    """The stream's frames' payloads, and each way the bytes break the framing."""
    frames, problems, pos = [], [], 0
    while pos < len(raw):
        if not raw.startswith(b"data: ", pos):
            problems.append(f"frame at byte {pos} does not start with 'data: ': {raw[pos:pos + 40]!r}")
            break
        end = raw.find(b"\n\n", pos)
        if end < 0:
            problems.append(f"frame at byte {pos} is not terminated by a blank line")
            break
        payload = raw[pos + 6:end]
        if b"\n" in payload or b"\r" in payload:
            problems.append(f"frame at byte {pos} spans lines")
        frames.append(payload)
        pos = end + 2
    if not frames or frames[-1] != b"[DONE]":
        problems.append("the stream does not end with data: [DONE]")
    if frames.count(b"[DONE]") != 1:
        problems.append(f"[DONE] appears {frames.count(b'[DONE]')} times")
    return frames, problems


def check_stream(raw: bytes, req: dict, chat: bool, full: dict) -> list[str]:
    """Every problem of one stream against the strict rules and the non-streamed body `full`."""
    frames, problems = split_frames(raw)
    chunks = []
    for f in frames[:-1]:
        try:
            obj = json.loads(f.decode("utf-8"), parse_constant=_no_constants)
        except ValueError as exc:
            problems.append(f"frame is not strict JSON ({exc}): {f[:80]!r}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"frame is not an object: {f[:80]!r}")
            continue
        chunks.append(obj)
    want_usage = bool(req.get("stream_options", {}).get("include_usage"))
    n_choices = len(full["choices"])
    texts = {i: "" for i in range(n_choices)}
    finishes = {i: [] for i in range(n_choices)}
    roles = {i: [] for i in range(n_choices)}
    usage_chunks = []
    ids = set()
    for pos, ch in enumerate(chunks):
        ids.add(ch.get("id"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        if ch.get("object") != obj or ch.get("model") != full["model"] or not isinstance(ch.get("created"), int):
            problems.append(f"chunk {pos} header wrong: {ch}")
        if ("usage" in ch) != want_usage:
            problems.append(f"chunk {pos}: usage key present={'usage' in ch}, include_usage={want_usage}")
        if ch.get("usage") is not None:
            usage_chunks.append(pos)
            if ch["choices"] != [] or ch["usage"] != full["usage"]:
                problems.append(f"usage chunk {pos} wrong: {ch} vs {full['usage']}")
            continue
        if not ch.get("choices"):
            problems.append(f"chunk {pos} has no choices and no usage")
        for c in ch.get("choices", []):
            i = c.get("index")
            if i not in texts:
                problems.append(f"chunk {pos}: choice index {i!r} out of range")
                continue
            if finishes[i]:
                problems.append(f"chunk {pos}: choice {i} continues after its finish_reason")
            if chat:
                delta = c.get("delta")
                if not isinstance(delta, dict) or set(delta) - {"role", "content"}:
                    problems.append(f"chunk {pos}: bad delta {delta!r}")
                    continue
                if "role" in delta:
                    roles[i].append((pos, delta["role"]))
                piece = delta.get("content", "")
            else:
                piece = c.get("text")
            if not isinstance(piece, str):
                problems.append(f"chunk {pos}: text of choice {i} is {piece!r}")
                continue
            if not piece and c.get("finish_reason") is None and not (chat and "role" in c["delta"]):
                problems.append(f"chunk {pos}: an empty chunk for choice {i}")
            texts[i] += piece  # appending only: what was sent stays sent
            if c.get("finish_reason") is not None:
                finishes[i].append(c["finish_reason"])
    if len(ids) > 1:
        problems.append(f"several ids in one stream: {ids}")
    if want_usage and usage_chunks != [len(chunks) - 1]:
        problems.append(f"usage chunks at {usage_chunks}, want exactly the last of {len(chunks)}")
    if not want_usage and usage_chunks:
        problems.append("a usage chunk without include_usage")
    for c in full["choices"]:
        i = c["index"]
        want_text = c["message"]["content"] if chat else c["text"]
        if texts[i] != want_text:
            problems.append(f"choice {i}: streamed {texts[i]!r} != non-streamed {want_text!r}")
        if finishes[i] != [c["finish_reason"]]:
            problems.append(f"choice {i}: finish_reasons {finishes[i]} (non-streamed {c['finish_reason']!r})")
        if chat:
            first = next((pos for pos, ch in enumerate(chunks) for x in ch.get("choices", []) if x["index"] == i),
                         None)
            if roles[i] != [(first, "assistant")]:
                problems.append(f"choice {i}: roles {roles[i]}, want role 'assistant' once, in its first delta")
    return problems


def requests() -> list[tuple[str, dict]]:
    out = []
    for path, n, usage, stop in itertools.product((C, CHAT), (1, 3), (False, True), (None, [" long live"])):
        if path == C:
            body = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 24, "temperature": 0, "n": n}
        else:
            body = {"model": "tiny-text", "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 24,
                    "temperature": 0, "n": n}
        if stop:
            body["stop"] = stop
        if usage:
            body["stream_options"] = {"include_usage": True}
        out.append((path, body))
    extra = [  # an EOS before max_tokens, echo, two prompts x n, a stop string that never appears, logprobs
        (C, {"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0}),
        (CHAT, {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 60, "temperature": 0, "n": 2,
                "stream_options": {"include_usage": True}}),
        (C, {"prompt": "KING.\n", "max_tokens": 16, "echo": True, "temperature": 0,
             "stream_options": {"include_usage": True}}),
        (C, {"prompt": ["ROMEO.\n", "KING LEAR.\n"], "max_tokens": 16, "n": 2, "temperature": 0, "stop": ["queen"]}),
        (C, {"prompt": "x", "max_tokens": 20, "temperature": 0, "stop": ["zebra", "the k"]}),
        (C, {"prompt": "x", "max_tokens": 12, "temperature": 0, "logprobs": 1}),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 12, "temperature": 0,
                "logprobs": True, "stop": ["dead"], "stream_options": {"include_usage": True}}),
    ]
    return out + extra


MISFRAMED = [  # the checker itself must reject each way a stream can be mis-framed
    b'data: {"a": 1}\ndata: [DONE]\n\n',
    b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {"a": 2}\n\n',
    b'data:{"a": 1}\n\ndata: [DONE]\n\n',
    b'data: {"a": 1}\n\n',
    b'data: {"a": 1}\n\ndata: [DONE]\n',
    b'event: x\ndata: {"a": 1}\n\ndata: [DONE]\n\n',
]


def test_sse_framing(stack):
    assert not split_frames(b'data: {"a": 1}\n\ndata: [DONE]\n\n')[1]
    assert all(split_frames(m)[1] for m in MISFRAMED)
    cases = requests()
    streams, malformed, failures, finishes = 0, 0, [], set()
    with httpx.Client(base_url=stack.base, timeout=60) as client:
        for path, body in cases:
            chat = path == CHAT
            plain = {k: v for k, v in body.items() if k != "stream_options"}
            full = client.post(path, json=plain)
            assert full.status_code == 200, (body, full.text)
            full = full.json()
            finishes |= {c["finish_reason"] for c in full["choices"]}
            with client.stream("POST", path, json={**body, "stream": True}) as r:
                assert r.status_code == 200, (body, r.read())
                assert r.headers["content-type"].startswith("text/event-stream"), r.headers
                raw = b"".join(r.iter_raw())
            streams += 1
            problems = check_stream(raw, body, chat, full)
            malformed += bool(problems)
            if problems:
                failures.append((path, body, problems[:5]))
            said = [c["message"]["content"] if chat else c["text"] for c in full["choices"]]
            if "stop" in body and any(s in t for s in body["stop"] for t in said):
                failures.append((path, body, ["a stop string survived in the text"]))
    assert stack.wait_idle(10) and stack.pool.pages_in_use == 0
    assert finishes == {"stop", "length"}  # the cases cover both ends: stop (string or EOS) and length
    figure("sse", streams_checked=streams, malformed_frames=malformed)
    assert not failures, "\n".join(map(str, failures))

