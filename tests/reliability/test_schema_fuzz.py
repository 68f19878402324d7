"""RELIABILITY.md B.4 test 3, schema fuzz: Schemathesis reads the live /openapi.json and sends what it generates from
it, valid (positive mode) and invalid (negative mode), to every operation; each response must keep the document's
promises. No 5xx, no status the operation does not declare (an explicit code: the document's "4XX" fallback does
not count here, and never a 422), a declared content type, a body that matches the declared schema, and for a
stream every event a valid chunk, an error object or the final [DONE].

Positive mode may still meet a 400: the document cannot carry limits that depend on the configuration or the model
(n, prompts, stop strings, context length, token ids within the vocabulary, what the decoding method accepts). Such
a 400 counts as correct only if the body really is valid for the request model, i.e. it is the route's semantic
refusal and not a validation rule the schema fails to state (Schemathesis's positive_data_acceptance would refuse
every 400, so this check replaces it). Negative mode's invalid data is not required to be refused: the request
models coerce leniently, as pydantic does by default (`"eos_early_exit": 0.0` reads as false, `"n": "2"` as 2), and
such a case still needs a declared status and a conforming body; the run prints how many were accepted.

Generation is derandomized, so CI sees the same cases every run. The server's limits are tightened (n, prompts) and
the fake model stops after a few tokens so that generated requests stay cheap; those limits are real server
behaviour, the generated oversize values get their 400.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from diffuserve.server.openapi import ChatCompletionChunk, CompletionChunk, ErrorResponse
from diffuserve.server.protocol import ChatRequest, CompletionRequest

from .conftest import fake_server
from .ledger import figure, rss_mb

EXAMPLES = 120  # hypothesis max_examples per operation and mode (operations without inputs yield fewer)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
BODY_MODEL = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}
CHUNK_MODEL = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


def declared_statuses(case) -> set[int]:
    return {int(code) for code in case.operation.responses.status_codes if code.isdigit()}


def extra_problems(case, response, mode: GenerationMode) -> list[str]:
    """What Schemathesis's own checks do not cover: explicit status codes, positive-mode 400s, stream events."""
    status, problems = response.status_code, []
    if status not in declared_statuses(case):
        problems.append(f"status {status} is not declared explicitly (declared: {sorted(declared_statuses(case))})")
    if status >= 400 and status != 499:
        try:
            ErrorResponse.model_validate_json(response.content)
        except ValidationError as exc:
            if case.operation.path not in ("/health", "/ready"):  # their 503 is a {"status": ...} body
                problems.append(f"error body is not an OpenAI error object: {exc.errors()[:1]}")
    model = BODY_MODEL.get(case.operation.path)
    if mode.is_positive and status == 400 and model is not None:
        try:
            model.model_validate(case.body)
        except ValidationError as exc:
            problems.append(f"a schema-valid body failed request validation, the schema is not honest: "
                            f"{exc.errors()[:1]}")
    if status == 200 and is_stream(response):
        problems += stream_problems(CHUNK_MODEL[case.operation.path], response.content.decode(),
                                    response.stream_cut_short)
    return problems


def is_stream(response) -> bool:
    return response.headers.get("content-type", [""])[0].startswith("text/event-stream")


def stream_problems(chunk_model, text: str, cut_short: bool) -> list[str]:
    """Every event a chunk or an error object, and the last one [DONE] (unless the client stopped reading: Schemathesis
    keeps max-stream-events, 20, and closes the connection, which the server must take as a disconnect)."""
    blocks = text.split("\n\n")
    events = [b.removeprefix("data: ") for b in blocks[:-1]]  # complete events only
    if not cut_short and (blocks[-1] or not events or events[-1] != "[DONE]"):
        return [f"the stream does not end with [DONE]: {text[-200:]!r}"]
    problems = []
    for data in events:
        if data == "[DONE]":
            continue
        try:
            body = json.loads(data)
            (ErrorResponse if "error" in body else chunk_model).model_validate(body)
        except (ValueError, ValidationError) as exc:
            problems.append(f"stream event {data[:200]!r}: {exc}")
    return problems


def _error_param(response) -> str:
    try:
        return str(json.loads(response.content)["error"]["param"])
    except (ValueError, KeyError, TypeError):
        return "?"


def replay(case, base: str) -> str:
    try:
        return case.as_curl_command(base_url=base)
    except (ValueError, TypeError, UnicodeError):  # a case curl cannot spell
        return f"{case.path_parameters} {case.body!r}"


def fuzz_operation(op, mode: GenerationMode, base: str, session, cases: Counter, statuses: Counter,
                   semantic: Counter, failures: list[str]) -> None:
    """Up to EXAMPLES generated cases of one operation in one mode, each sent and checked; failures are collected."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case):
        cases[mode.value, op.label] += 1
        response = case.call(base_url=base, session=session, timeout=30)
        statuses[mode.value, f"{response.status_code} stream" if is_stream(response) else response.status_code] += 1
        if mode.is_positive and response.status_code == 400:
            semantic[_error_param(response)] += 1
        problems = []
        try:
            case.validate_response(response, checks=CHECKS, transport_kwargs={"base_url": base})
        except FailureGroup as exc:  # its message names each failed check, with a curl to replay the case
            problems.append(str(exc))
        problems += extra_problems(case, response, mode)
        if problems:
            failures.append(f"[{mode.value}] {op.label} -> {response.status_code}: {replay(case, base)[:600]}\n  "
                            + "\n  ".join(p[:1500] for p in problems))

    fuzz()


def test_schema_fuzz():
    with fake_server(delay=0.0, length=6, server__max_n=2, server__max_prompts=2) as stack:
        schema = schemathesis.openapi.from_url(stack.base + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 10, [op.label for op in operations]
        doc = json.dumps(requests.get(stack.base + "/openapi.json", timeout=10).json())
        assert '"422"' not in doc and "HTTPValidationError" not in doc  # malformed input is our 400, never 422

        session = requests.Session()
        cases: Counter = Counter()  # (mode, operation) -> cases sent
        statuses: Counter = Counter()  # (mode, status) -> responses
        semantic: Counter = Counter()  # positive-mode 400s (valid bodies over a semantic limit), by param
        failures: list[str] = []
        no_negative: list[str] = []  # operations for which negative mode cannot generate anything
        rss_before = rss_mb()
        start = time.monotonic()
        for op in operations:
            for mode in MODES:
                try:
                    fuzz_operation(op, mode, stack.base, session, cases, statuses, semantic, failures)
                except Unsatisfiable:
                    # No input at all, or only a path string: no invalid request can be built for it.
                    assert mode.is_negative and not cases[mode.value, op.label], (mode, op.label)
                    no_negative.append(op.label)
        wall = time.monotonic() - start
        idle = stack.wait_idle()
        rss_drift = round(rss_mb() - rss_before, 1)
        session.close()

    per_mode = Counter()
    for (mode, _), n in cases.items():
        per_mode[mode] += n
    total = sum(cases.values())
    print(f"schema fuzz: {total} cases in {wall:.1f}s; per mode {dict(per_mode)}; per operation {dict(cases)}; "
          f"statuses {dict(statuses)}; positive-mode 400s by param {dict(semantic)}; "
          f"no negative cases possible for {no_negative}")
    assert not failures, f"{len(failures)} of {total} cases failed:\n\n" + "\n\n".join(failures[:20])
    assert idle, "the engine did not go idle (a request or KV pages still held) after the fuzz run"
    assert total >= 500 and per_mode["positive"] and per_mode["negative"], (total, dict(per_mode))
    figure("schema_fuzz", operations=len(operations), examples_per_op=EXAMPLES, cases_run=total, failures=0,
           rss_drift_mb=rss_drift)
