"""RELIABILITY.md B.4 #1 (validation matrix), #2 (poisoning check) and #5 (error amplification).

#1 and #5 run against the real app and engine loop over the FakeRunner; #2 against the real tiny-text model, whose
temperature-0 answers must be byte-identical before and after a volley of bad inputs mixed with good traffic.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from .conftest import free_port, serving, tiny_text
from .ledger import figure

C, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"
J = "application/json"
DROP = object()
OK = {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 8}
MSG = {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ERROR_KEYS = {"message", "type", "param", "code"}


def body(base: dict, **changes) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


def raw(text: str) -> bytes:
    return text.encode()


CONTEXT = tiny_text().spec.max_positions  # 1024
VOCAB = tiny_text().spec.vocab_size  # 4096

# (name, HTTP method, path, JSON body / raw bytes / None, content type, expected status, expected param or None)
CASES = [
    # --- completions: prompt ---------------------------------------------------------------------------------
    ("missing prompt", "POST", C, body(OK, prompt=DROP), J, 400, "prompt"),
    ("prompt null", "POST", C, body(OK, prompt=None), J, 400, None),
    ("prompt a number", "POST", C, body(OK, prompt=5), J, 400, None),
    ("prompt an object", "POST", C, body(OK, prompt={"text": "a"}), J, 400, None),
    ("empty prompt string", "POST", C, body(OK, prompt=""), J, 400, "prompt"),
    ("empty prompt list", "POST", C, body(OK, prompt=[]), J, 400, "prompt"),
    ("empty token list", "POST", C, body(OK, prompt=[[]]), J, 400, "prompt"),
    ("token id -1", "POST", C, body(OK, prompt=[5, -1]), J, 400, "prompt"),
    ("token id == vocab", "POST", C, body(OK, prompt=[5, VOCAB]), J, 400, "prompt"),
    ("token id 2**40", "POST", C, body(OK, prompt=[[5, 2**40]]), J, 400, "prompt"),
    ("token id fractional", "POST", C, body(OK, prompt=[5, 1.5]), J, 400, None),
    ("mixed ids and strings", "POST", C, body(OK, prompt=[1, "a"]), J, 400, None),
    ("too many prompts", "POST", C, body(OK, prompt=["a"] * 100), J, 400, "prompt"),
    ("prompt over the context", "POST", C, body(OK, prompt=[5] * (CONTEXT + 1)), J, 400, "prompt"),
    ("prompt + max_tokens > context", "POST", C, body(OK, prompt=[5] * 1000, max_tokens=CONTEXT - 999), J, 400,
     "max_tokens"),
    ("lone surrogate in prompt", "POST", C, raw('{"prompt": "a\\ud800b", "max_tokens": 4}'), J, 400, None),
    ("900-deep nested prompt list", "POST", C, raw('{"prompt": ' + "[" * 900 + "1" + "]" * 900 + "}"), J, 400,
     None),
    # --- completions: numbers --------------------------------------------------------------------------------
    ("max_tokens 0", "POST", C, body(OK, max_tokens=0), J, 400, "max_tokens"),
    ("max_tokens negative", "POST", C, body(OK, max_tokens=-5), J, 400, "max_tokens"),
    ("max_tokens huge", "POST", C, body(OK, max_tokens=10**12), J, 400, "max_tokens"),
    ("max_tokens 2**64", "POST", C, body(OK, max_tokens=2**64), J, 400, "max_tokens"),
    ("max_tokens a string", "POST", C, body(OK, max_tokens="ten"), J, 400, "max_tokens"),
    ("max_tokens fractional", "POST", C, body(OK, max_tokens=1.5), J, 400, "max_tokens"),
    ("max_tokens NaN", "POST", C, raw('{"prompt": "x", "max_tokens": NaN}'), J, 400, "max_tokens"),
    ("max_tokens 1e400", "POST", C, raw('{"prompt": "x", "max_tokens": 1e400}'), J, 400, "max_tokens"),
    ("max_tokens 5000 digits", "POST", C, raw('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"), J, 400, None),
    ("seed 5000 digits", "POST", C, raw('{"prompt": "x", "seed": ' + "7" * 5000 + "}"), J, 400, None),
    ("token id 5000 digits", "POST", C, raw('{"prompt": [5, ' + "3" * 5000 + "]}"), J, 400, None),
    # --- sampling fields no LLaDA-family method reads (issue 33: top_p was silently ignored) -----------------
    ("top_p below 1 with window", "POST", C, body(OK, top_p=0.0001, temperature=1.0), J, 400, "top_p"),
    ("top_k 50 with window", "POST", C, body(OK, top_k=50), J, 400, "top_k"),
    ("top_k with llada", "POST", C, body(OK, top_k=5, method="llada"), J, 400, "top_k"),
    ("min_p", "POST", C, body(OK, min_p=0.1), J, 400, "min_p"),
    ("repetition_penalty", "POST", C, body(OK, repetition_penalty=1.3), J, 400, "repetition_penalty"),
    ("use_beam_search", "POST", C, body(OK, use_beam_search=True), J, 400, "use_beam_search"),
    ("stop_token_ids", "POST", C, body(OK, stop_token_ids=[5]), J, 400, "stop_token_ids"),
    ("include_stop_str_in_output", "POST", C, body(OK, include_stop_str_in_output=True), J, 400,
     "include_stop_str_in_output"),
    ("chat top_k", "POST", CHAT, body(MSG, top_k=3), J, 400, "top_k"),
    ("n 0", "POST", C, body(OK, n=0), J, 400, "n"),
    ("n over the cap", "POST", C, body(OK, n=17), J, 400, "n"),
    ("n a million", "POST", C, body(OK, n=10**6), J, 400, "n"),
    ("temperature negative", "POST", C, body(OK, temperature=-0.5), J, 400, "temperature"),
    ("temperature 3", "POST", C, body(OK, temperature=3), J, 400, "temperature"),
    ("temperature a string", "POST", C, body(OK, temperature="hot"), J, 400, "temperature"),
    ("temperature NaN", "POST", C, raw('{"prompt": "x", "temperature": NaN}'), J, 400, "temperature"),
    ("temperature Infinity", "POST", C, raw('{"prompt": "x", "temperature": Infinity}'), J, 400, "temperature"),
    ("temperature -Infinity", "POST", C, raw('{"prompt": "x", "temperature": -Infinity}'), J, 400, "temperature"),
    ("top_p 0", "POST", C, body(OK, top_p=0), J, 400, "top_p"),
    ("top_p negative", "POST", C, body(OK, top_p=-0.1), J, 400, "top_p"),
    ("top_p 1.5", "POST", C, body(OK, top_p=1.5), J, 400, "top_p"),
    ("top_p NaN", "POST", C, raw('{"prompt": "x", "top_p": NaN}'), J, 400, "top_p"),
    ("top_p 1e-400 (underflows to 0)", "POST", C, raw('{"prompt": "x", "top_p": 1e-400}'), J, 400, "top_p"),
    ("seed negative", "POST", C, body(OK, seed=-1), J, 400, "seed"),
    ("seed 2**64", "POST", C, body(OK, seed=2**64), J, 400, "seed"),
    ("seed NaN", "POST", C, raw('{"prompt": "x", "seed": NaN}'), J, 400, "seed"),
    ("logprobs 21", "POST", C, body(OK, logprobs=21), J, 400, "logprobs"),
    ("logprobs -1", "POST", C, body(OK, logprobs=-1), J, 400, "logprobs"),
    # --- completions: stop, stream, other types --------------------------------------------------------------
    ("five stop strings", "POST", C, body(OK, stop=["a", "b", "c", "d", "e"]), J, 400, "stop"),
    ("empty stop string", "POST", C, body(OK, stop=[""]), J, 400, "stop"),
    ("stop a number", "POST", C, body(OK, stop=123), J, 400, None),
    ("stop list of numbers", "POST", C, body(OK, stop=[1, 2]), J, 400, None),
    ("stream a number", "POST", C, body(OK, stream=5), J, 400, "stream"),
    ("stream_options a string", "POST", C, body(OK, stream=True, stream_options="yes"), J, 400, "stream_options"),
    ("stream_options a list", "POST", C, body(OK, stream=True, stream_options=[1]), J, 400, "stream_options"),
    ("stream_options.include_usage wrong type", "POST", C,
     body(OK, stream=True, stream_options={"include_usage": "perhaps"}), J, 400, "stream_options.include_usage"),
    ("echo wrong type", "POST", C, body(OK, echo="maybe"), J, 400, "echo"),
    ("model a number", "POST", C, body(OK, model=5), J, 400, "model"),
    ("user a number", "POST", C, body(OK, user=5), J, 400, "user"),
    ("unknown model", "POST", C, body(OK, model="gpt-5"), J, 404, "model"),
    # --- diffusion knobs ---------------------------------------------------------------------------------------
    ("unknown method", "POST", C, body(OK, method="telepathy"), J, 400, "method"),
    ("method of another family", "POST", C, body(OK, method="dream"), J, 400, "method"),
    ("method a number", "POST", C, body(OK, method=5), J, 400, "method"),
    ("steps 0", "POST", C, body(OK, steps=0), J, 400, "steps"),
    ("steps over max_tokens", "POST", C, body(OK, steps=64), J, 400, "steps"),
    ("threshold 2", "POST", C, body(OK, threshold=2), J, 400, "threshold"),
    ("threshold NaN", "POST", C, raw('{"prompt": "x", "threshold": NaN}'), J, 400, "threshold"),
    ("window_tokens 0", "POST", C, body(OK, window_tokens=0), J, 400, "window_tokens"),
    ("active_tokens negative", "POST", C, body(OK, active_tokens=-3), J, 400, "active_tokens"),
    ("refresh_cycle 0", "POST", C, body(OK, refresh_cycle=0), J, 400, "refresh_cycle"),
    ("refresh policy unknown", "POST", C, body(OK, refresh="sometimes"), J, 400, "refresh"),
    ("remasking unknown", "POST", C, body(OK, remasking="psychic"), J, 400, "remasking"),
    ("block_length with the window method", "POST", C, body(OK, block_length=4), J, 400, None),
    # --- fields we cannot honour, code-like fields ------------------------------------------------------------
    ("logit_bias", "POST", C, body(OK, logit_bias={"5": 10}), J, 400, "logit_bias"),
    ("best_of 3", "POST", C, body(OK, best_of=3), J, 400, "best_of"),
    ("suffix", "POST", C, body(OK, suffix="the end"), J, 400, "suffix"),
    ("presence_penalty", "POST", C, body(OK, presence_penalty=1.0), J, 400, "presence_penalty"),
    ("frequency_penalty", "POST", C, body(OK, frequency_penalty=0.5), J, 400, "frequency_penalty"),
    ("chat_template on completions", "POST", C, body(OK, chat_template="{{ 7*7 }}"), J, 400, "chat_template"),
    ("guided_json", "POST", C, body(OK, guided_json={"type": "object"}), J, 400, "guided_json"),
    ("guided_regex", "POST", C, body(OK, guided_regex="a+"), J, 400, "guided_regex"),
    ("prompt_embeds", "POST", C, body(OK, prompt_embeds="AAAA"), J, 400, "prompt_embeds"),
    # --- chat ----------------------------------------------------------------------------------------------------
    ("chat without messages", "POST", CHAT, body(MSG, messages=DROP), J, 400, "messages"),
    ("chat with empty messages", "POST", CHAT, body(MSG, messages=[]), J, 400, "messages"),
    ("chat messages a string", "POST", CHAT, body(MSG, messages="hi"), J, 400, "messages"),
    ("chat bad role", "POST", CHAT, body(MSG, messages=[{"role": "wizard", "content": "x"}]), J, 400, None),
    ("chat tool role", "POST", CHAT, body(MSG, messages=[{"role": "tool", "content": "x"}]), J, 400, None),
    ("chat missing content", "POST", CHAT, body(MSG, messages=[{"role": "user"}]), J, 400, None),
    ("chat missing role", "POST", CHAT, body(MSG, messages=[{"content": "x"}]), J, 400, None),
    ("chat content a number", "POST", CHAT, body(MSG, messages=[{"role": "user", "content": 5}]), J, 400, None),
    ("chat image content part", "POST", CHAT,
     body(MSG, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), J,
     400, None),
    ("chat request-supplied chat_template", "POST", CHAT,
     body(MSG, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"), J, 400, "chat_template"),
    ("chat chat_template_kwargs", "POST", CHAT, body(MSG, chat_template_kwargs={"x": 1}), J, 400,
     "chat_template_kwargs"),
    ("chat tools", "POST", CHAT, body(MSG, tools=[{"type": "function", "function": {"name": "f"}}]), J, 400,
     "tools"),
    ("chat functions", "POST", CHAT, body(MSG, functions=[{"name": "f"}]), J, 400, "functions"),
    ("chat tool_choice auto", "POST", CHAT, body(MSG, tool_choice="auto"), J, 400, "tool_choice"),
    ("chat logit_bias", "POST", CHAT, body(MSG, logit_bias={"5": -100}), J, 400, "logit_bias"),
    ("chat top_logprobs huge", "POST", CHAT, body(MSG, logprobs=True, top_logprobs=10**6), J, 400,
     "top_logprobs"),
    ("chat top_logprobs = vocab", "POST", CHAT, body(MSG, logprobs=True, top_logprobs=VOCAB), J, 400,
     "top_logprobs"),
    ("chat json response_format", "POST", CHAT, body(MSG, response_format={"type": "json_object"}), J, 400,
     "response_format"),
    ("chat stream_options wrong type", "POST", CHAT, body(MSG, stream=True, stream_options=7), J, 400,
     "stream_options"),
    ("chat max_completion_tokens 0", "POST", CHAT, body(MSG, max_completion_tokens=0), J, 400,
     "max_completion_tokens"),
    ("chat max_tokens over context", "POST", CHAT, body(MSG, max_tokens=CONTEXT), J, 400, "max_tokens"),
    ("chat n over the cap", "POST", CHAT, body(MSG, n=17), J, 400, "n"),
    ("chat unknown model", "POST", CHAT, body(MSG, model="other"), J, 404, "model"),
    ("chat lone surrogate in content", "POST", CHAT,
     raw('{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 4}'), J, 400, None),
    # --- bytes that are not a JSON object ---------------------------------------------------------------------
    ("invalid JSON", "POST", C, raw('{"prompt": "a",'), J, 400, None),
    ("invalid UTF-8 in the prompt", "POST", C, b'{"prompt": "\xff\xfe\xc3", "max_tokens": 4}', J, 400, None),
    ("invalid UTF-8 outside strings", "POST", C, b'{"prompt": "a", \x80\x81: 1}', J, 400, None),
    ("raw NUL byte in JSON", "POST", C, b'{"prompt": "a"\x00}', J, 400, None),
    ("raw NUL byte inside the prompt string", "POST", C, b'{"prompt": "a\x00b"}', J, 400, None),
    ("10k-deep nested arrays", "POST", C, b"[" * 10_000 + b"]" * 10_000, J, 400, None),
    ("10k-deep nested prompt", "POST", C, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", J, 400, None),
    ("10k-deep nested objects", "POST", C, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, J, 400, None),
    ("body is an array", "POST", C, raw("[1, 2]"), J, 400, None),
    ("body is a string", "POST", C, raw('"hello"'), J, 400, None),
    ("body is null", "POST", C, raw("null"), J, 400, None),
    ("empty body", "POST", C, b"", J, 400, None),
    ("empty object", "POST", C, raw("{}"), J, 400, "prompt"),
    ("chat body is an array", "POST", CHAT, raw("[]"), J, 400, None),
    ("body over the limit", "POST", C, json.dumps(body(OK, prompt="a " * 600_000)).encode(), J, 413, None),
    # --- content types, routes, methods ----------------------------------------------------------------------
    ("form-encoded body", "POST", C, b"prompt=hello&max_tokens=4", "application/x-www-form-urlencoded", 415, None),
    ("text/plain body", "POST", C, json.dumps(OK).encode(), "text/plain", 415, None),
    ("multipart body", "POST", C, b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", 415, None),
    ("xml body", "POST", CHAT, b"<messages/>", "application/xml", 415, None),
    ("unknown route", "POST", "/v1/embeddings", json.dumps({"input": "a"}).encode(), J, 404, None),
    ("unknown route, GET", "GET", "/v2/completions", None, J, 404, None),
    ("unknown model card", "GET", MODELS + "/no-such-model", None, J, 404, "model"),
    ("GET on completions", "GET", C, None, J, 405, None),
    ("PUT on chat", "PUT", CHAT, json.dumps(MSG).encode(), J, 405, None),
    ("DELETE on models", "DELETE", MODELS, None, J, 405, None),
    ("POST on health", "POST", "/health", raw("{}"), J, 405, None),
]


def is_error_shape(resp: httpx.Response) -> bool:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(err, dict) and set(err) == ERROR_KEYS and isinstance(err["message"], str)
            and bool(err["message"]) and isinstance(err["type"], str) and bool(err["type"]))


def send(client: httpx.Client, method: str, path: str, payload, ctype: str) -> httpx.Response:
    content = payload if isinstance(payload, (bytes, type(None))) else json.dumps(payload).encode()
    headers = {"content-type": ctype} if content is not None else {}
    return client.request(method, path, content=content, headers=headers)


def test_validation_matrix(stack):
    names = [c[0] for c in CASES]
    assert len(set(names)) == len(names) >= 45
    tried, shape_ok, five_xx, wrong = 0, 0, 0, []
    client = httpx.Client(base_url=stack.base, timeout=30)  # one keep-alive connection, as a pooled client has
    try:
        for name, method, path, payload, ctype, status, param in CASES:
            try:
                r = send(client, method, path, payload, ctype)
            except httpx.TransportError as exc:  # the server dropped the kept-alive connection: a problem too
                wrong.append((name, f"no response on the kept-alive connection: {exc!r}", ""))
                client.close()
                client = httpx.Client(base_url=stack.base, timeout=30)
                r = send(client, method, path, payload, ctype)
            tried += 1
            five_xx += r.status_code >= 500
            good_shape = is_error_shape(r)
            shape_ok += good_shape
            problem = []
            if r.status_code != status:
                problem.append(f"status {r.status_code} != {status}")
            if not good_shape:
                problem.append("not the OpenAI error shape")
            elif param is not None and r.json()["error"]["param"] != param:
                problem.append(f"param {r.json()['error']['param']!r} != {param!r}")
            if problem:
                wrong.append((name, "; ".join(problem), r.text[:300]))
        good = client.post(C, json=OK)
        alive = int(good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length"))
    finally:
        client.close()
    assert stack.wait_idle(10) and stack.pool.pages_in_use == 0
    figure("validation", bad_inputs_tried=tried, shape_ok=shape_ok, **{"5xx": five_xx}, server_alive=alive)
    assert not wrong, "\n".join(map(str, wrong))
    assert five_xx == 0 and shape_ok == tried and alive == 1


# -- B.4 #5: error amplification ------------------------------------------------------------------------------------

def amplification_cases() -> list[tuple[str, str, bytes, str]]:
    bad_msgs = [{"role": "wizard", "content": 5, "name": [1]}] * 1000
    cases = [
        ("1000 bad messages", CHAT, json.dumps({"messages": bad_msgs})),
        ("1000 messages missing everything", CHAT, json.dumps({"messages": [{}] * 1000})),
        ("1000 messages of bad content parts", CHAT,
         json.dumps({"messages": [{"role": "user", "content": [{"type": "img", "text": 1}] * 5}] * 200})),
        ("1000 prompt elements of wrong types", C, json.dumps({"prompt": [None, {}, 1.5, [], "a", True] * 167})),
        ("1000 nested token lists of wrong types", C, json.dumps({"prompt": [["a", None, -1.5]] * 1000})),
        ("every field wrong", C, json.dumps({k: {"x": [None]} for k in (
            "prompt", "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
            "user", "echo", "logprobs", "method", "steps", "block_length", "threshold", "remasking", "alg",
            "window_tokens", "active_tokens", "refresh_cycle", "refresh", "eos_early_exit")})),
        ("every chat field wrong", CHAT, json.dumps({k: [[None]] for k in (
            "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
            "stream", "stream_options", "user", "logprobs", "top_logprobs", "method", "steps")})),
        ("1000 bad stop strings", C, json.dumps({"prompt": "x", "stop": [1] * 1000})),
        ("1000 unhonourable fields at once", C, json.dumps({"prompt": "x", "logit_bias": {str(i): 1 for i in
                                                                                           range(1000)}})),
        ("wide object of 5000 unknown keys and a bad prompt", C, json.dumps(
            {**{f"k{i}": i for i in range(5000)}, "prompt": None})),
        ("1000 out-of-vocab ids", C, json.dumps({"prompt": [-1] * 1000})),
        ("1000 prompts over the cap", C, json.dumps({"prompt": ["a"] * 1000})),
        ("long unknown model name", C, json.dumps({"prompt": "x", "model": "m" * 20_000})),
        ("long unknown method name", C, json.dumps({"prompt": "x", "method": "z" * 20_000})),
        ("deep nesting inside a list of messages", CHAT, json.dumps({"messages": [[[[[[{}]]]]]] * 500})),
        ("500 prompts of 2 bad ids each", C, json.dumps({"prompt": [[5, VOCAB + i] for i in range(500)]})),
    ]
    return [(name, path, text.encode(), J) for name, path, text in cases]


SMALL = [(C, b"{}"), (C, b"["), (C, b'{"prompt": "x", "method": "q"}'), (CHAT, b'{"messages": [{}]}'),
         (C, b'{"prompt": [-1]}'), (C, b'{"prompt": "x", "model": "m"}'), (CHAT, b'{"messages": 1, "n": 0}')]


def test_error_amplification(stack):
    worst, rows, problems = 0.0, [], []
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        cases = amplification_cases()
        for name, path, payload, ctype in cases:
            r = client.post(path, content=payload, headers={"content-type": ctype})
            ratio = len(r.content) / len(payload)
            worst = max(worst, ratio)
            rows.append((name, len(payload), len(r.content), round(ratio, 3)))
            if not 400 <= r.status_code < 500 or not is_error_shape(r):
                problems.append((name, r.status_code, r.text[:200]))
            if ratio > 10:
                problems.append((name, "amplification", ratio))
            # Only the first validation error is reported, so a response stays small whatever the body's size,
            # unless the server echoes a (long) value the client sent.
            if len(payload) <= 4096 and len(r.content) > 1024:
                problems.append((name, "response over 1 KB for a small body", len(r.content)))
        # Tiny bodies cannot stay under 10x (the error envelope alone is ~100 bytes): they get an absolute bound.
        small_max = 0
        for path, payload in SMALL:
            r = client.post(path, content=payload, headers={"content-type": J})
            small_max = max(small_max, len(r.content))
            if not 400 <= r.status_code < 500 or not is_error_shape(r) or len(r.content) > 1024:
                problems.append((payload, r.status_code, len(r.content), r.text[:200]))
        assert client.post(C, json=OK).status_code == 200
    figure("amplification", max_amplification=f"{worst:.3f}", cases=len(rows), small_cases=len(SMALL),
           small_max_response_bytes=small_max)
    for row in rows:
        print("  amplification", *row)
    assert not problems, problems


# -- B.4 #2: poisoning check on the real tiny-text model --------------------------------------------------------------

GOLDEN = [
    {"model": "tiny-text", "prompt": "ROMEO.\n", "max_tokens": 16, "temperature": 0},
    {"model": "tiny-text", "prompt": "KING LEAR.\nBlow, winds,", "max_tokens": 16, "temperature": 0},
    {"model": "tiny-text", "prompt": [5, 17, 99, 250, 1000], "max_tokens": 16, "temperature": 0},
]

POISON = [  # raw bodies aimed at the paths a bad input could corrupt: tokenizer, KV pool, decoder state
    b'{"prompt": [5, -1], "max_tokens": 16}',
    b'{"prompt": [5, 4096], "max_tokens": 16}',
    b'{"prompt": [[5], [9223372036854775807]], "max_tokens": 16}',
    b'{"prompt": "\xff\xfe\xfd", "max_tokens": 16}',
    b'{"prompt": "a\\ud800", "max_tokens": 16}',
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "top_p": Infinity}',
    b'{"prompt": "x", "max_tokens": -1}',
    b'{"prompt": "x", "max_tokens": 1024}',
    b'{"prompt": "x", "steps": 0}',
    b'{"prompt": "x", "block_length": 3}',
    b'{"prompt": "x", "threshold": 7}',
    b'{"prompt": "x", "n": 99}',
    b'{"prompt": "x", "seed": -5}',
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "x"\x00}',
    b"[" * 10_000 + b"]" * 10_000,
    b'{"messages": [], "max_tokens": 4}',
    b'{"prompt": "x", "logit_bias": {"5": 100}}',
    b'{"prompt": "x", "chat_template": "{{ 7 * 7 }}"}',
    b'{"prompt": "", "max_tokens": 16}',
    b'{"prompt": [], "max_tokens": 16}',
]


@pytest.fixture(scope="module")
def real_server():
    """The real tiny-text model behind the real app, built as `diffuserve serve` builds it (one torch thread)."""
    from diffuserve.engine.config import build_config
    from diffuserve.engine.metrics import Metrics
    from diffuserve.server.app import build_engine
    from diffuserve.server.routes import create_app

    cfg = build_config(None, model__path="tiny-text", server__port=free_port(), engine__max_running=4,
                       engine__threads=1, engine__kv_cache_mb=32)
    llm = tiny_text()  # LLM("tiny-text"), loaded once per session; here its weights run
    metrics = Metrics("tiny-text")
    engine, front = build_engine(cfg, llm, metrics)
    app = create_app(cfg, llm, front, metrics, ready=lambda: not engine.scheduler.draining)
    with serving(app, cfg, engine):
        yield f"http://127.0.0.1:{cfg.server.port}", engine


def test_poisoning_check(real_server):
    base, engine = real_server
    with httpx.Client(base_url=base, timeout=120) as client:
        def golden() -> list[bytes]:
            texts = []
            for g in GOLDEN:
                r = client.post(C, json=g)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["text"].encode())
            return texts

        before = golden()
        assert all(before), before  # the model says something for each
        good_statuses, bad_statuses, lock = [], [], threading.Lock()

        def good_traffic(i):  # concurrent good requests, sharing batches with whatever the bad ones leave behind
            with httpx.Client(base_url=base, timeout=120) as c:
                for k in range(3):
                    body_ = {"prompt": f"Speak, {i} {k}.\n", "max_tokens": 16, "temperature": 0.7, "seed": i * 10 + k}
                    r = c.post(C, json=body_)
                    with lock:
                        good_statuses.append(r.status_code)

        threads = [threading.Thread(target=good_traffic, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for payload in POISON:  # each on its own connection: the matrix checks what a bad input does to keep-alive
            with httpx.Client(base_url=base, timeout=60) as one:
                r = one.post(C, content=payload, headers={"content-type": J})
            bad_statuses.append((r.status_code, is_error_shape(r), payload[:60]))
        for t in threads:
            t.join()
        assert engine.wait_idle(30)
        after = golden()
    matched = sum(a == b for a, b in zip(before, after))
    figure("poisoning", golden_after_bad_match=f"{matched}/{len(GOLDEN)}", bad_inputs=len(POISON),
           concurrent_good=len(good_statuses))
    not_refused = [b for b in bad_statuses if not (400 <= b[0] < 500 and b[1])]
    assert not not_refused, not_refused
    assert good_statuses == [200] * 9, good_statuses
    assert before == after, (before, after)


def test_sampling_fields_at_their_off_value_are_accepted(stack):
    """What OpenAI and vLLM clients send when they mean "off" is accepted by every method."""
    for off in ({"top_p": 1}, {"top_k": -1}, {"top_k": 0}, {"min_p": 0}, {"repetition_penalty": 1.0},
                {"use_beam_search": False}, {"stop_token_ids": []}, {"skip_special_tokens": True}):
        r = httpx.post(stack.base + C, json=body(OK, **off), timeout=60)
        assert r.status_code == 200, (off, r.text)


def test_mask_tokens_in_a_prompt_are_refused(stack):
    """`<|mask|>` typed in a completion prompt (or its id) would be filled by the model like the canvas (200, empty
    text, finish "length"): a 400 naming the field instead; /tokenize still tokenizes it."""
    mask = tiny_text().spec.mask_id
    base = stack.base
    cases = [("/v1/completions", {"prompt": "ROMEO.\n<|mask|><|mask|> speaks", "max_tokens": 4}, "prompt"),
             ("/v1/completions", {"prompt": [5, mask, 7], "max_tokens": 4}, "prompt"),
             ("/v1/completions", {"prompt": ["ok", "a <|mask|>"], "max_tokens": 4}, "prompt")]
    for path, payload, param in cases:
        r = httpx.post(base + path, json=payload, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (payload, r.text)
        assert "mask token" in r.json()["error"]["message"]
    assert mask in httpx.post(base + "/tokenize", json={"prompt": "a <|mask|>"}).json()["tokens"]
    # In a chat message it is text like any special token's string (test_prompts): no mask reaches the model.
    chat = {"messages": [{"role": "user", "content": "fill <|mask|> in"}]}
    assert mask not in httpx.post(base + "/tokenize", json=chat).json()["tokens"]
    assert httpx.post(base + "/v1/chat/completions", json={**chat, "max_tokens": 4}).status_code == 200
    assert httpx.post(base + "/v1/completions", json={"prompt": "ROMEO.\n", "max_tokens": 4}).status_code == 200
