"""Fuzzing the HTTP API of a real `neo serve` from its own OpenAPI schema (schemathesis + hypothesis),
bounded in examples and time: no 5xx, responses as the schema documents them (status codes, content
types, bodies), OpenAI-shaped error bodies on every 4xx, well-formed SSE streams, schema-invalid bodies
refused with a 4xx, and afterwards the server healthy with every KV block free."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis import checks as C

from support.replica import SMALL_POOL_BLOCKS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
EXAMPLES = {"GET": 10, "POST": 80}      # per operation and generation mode
BUDGET_S = {"GET": 10.0, "POST": 60.0}  # per operation and mode; examples past it are skipped
MAX_TOKENS = 3                          # decoding on a 2-core CPU costs ~60-100 ms per token
REQUEST_TIMEOUT_S = 60.0                # a request running longer counts as a hang
# schemathesis stops reading an event stream after 20 events by default; a chat stream with n=20
# sends 20 role chunks before any token, so the [DONE] check needs the whole stream
MAX_STREAM_EVENTS = 10_000
# Unset: the same examples every run (a regression suite). Set: another walk, e.g. to hunt for new bugs;
# NEO_FUZZ_SCALE multiplies the example counts and time budgets.
SEED = os.environ.get("NEO_FUZZ_SEED")
SCALE = float(os.environ.get("NEO_FUZZ_SCALE", "1"))
CHECKS = [C.not_a_server_error, C.status_code_conformance, C.content_type_conformance,
          C.response_schema_conformance, C.negative_data_rejection]


def tame(case, draw: int):
    """Aim most bodies at the served model, its vocabulary and SSE now and then; keep generation short.

    Everything else stays as generated. ``draw`` is a second hypothesis draw (0..7; 0 is the likeliest).
    """
    body = case.body
    if isinstance(body, dict) and draw != 7:
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(v) is int for v in prompt):
            body["prompt"] = [abs(v) % VOCAB for v in prompt]
        if draw in (1, 2) and "stream" not in body:
            body["stream"] = True
            if draw == 2 and "stream_options" not in body:   # never overwrite a field: it may be the
                body["stream_options"] = {"include_usage": True}   # one a negative case made invalid
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and MAX_TOKENS < v <= 512:
                body[key] = MAX_TOKENS  # larger values still go through unchanged: they must get a 400
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 2  # chat's default is the rest of the context (an explicit null stays)
    return case


def check_openai_shape(resp: schemathesis.Response) -> None:
    """What the schema cannot say: error bodies name a field the request had, and SSE is well formed."""
    if resp.status_code >= 400:
        body = resp.json()
        assert body.get("object") == "error" and isinstance(body["error"]["message"], str), resp.text
        assert set(body["error"]) >= {"message", "type", "param", "code"}, resp.text
        return
    if (resp.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
        assert not resp.stream_cut_short, "the client stopped reading the stream (timeout or event cap)"
        events = [line[6:] for line in resp.text.split("\n\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", resp.text[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all("error" not in c for c in chunks), resp.text[-500:]
        assert any(ch["finish_reason"] for c in chunks for ch in c["choices"]), resp.text[-500:]


def fuzz_operation(url: str, op, mode: GenerationMode, stats: dict) -> None:
    method = op.method.upper()
    strategy = st.tuples(op.as_strategy(generation_mode=mode), st.integers(0, 7)).map(
        lambda t: tame(*t))
    deadline = time.monotonic() + BUDGET_S[method] * SCALE
    seen = stats.setdefault(f"{op.label} {mode.value}", {})

    @settings(max_examples=int(EXAMPLES[method] * SCALE), deadline=None, database=None, derandomize=SEED is None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case) -> None:
        if time.monotonic() > deadline:
            return
        resp = case.call(base_url=url, timeout=REQUEST_TIMEOUT_S)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        why = resp.json()["error"]["param"] if resp.status_code == 400 else (
            "stream" if resp.status_code == 200 and isinstance(case.body, dict) and case.body.get("stream") else None)
        if why:
            seen[why] = seen.get(why, 0) + 1
        case.validate_response(resp, checks=CHECKS)
        check_openai_shape(resp)

    (seed(int(SEED))(run) if SEED else run)()


def wait_idle(replica, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (replica.metric("vllm:num_requests_running") == 0 and replica.metric("vllm:num_requests_waiting") == 0
                and replica.metric("neo:gpu_kv_blocks_free") == SMALL_POOL_BLOCKS):
            return
        time.sleep(0.2)
    raise AssertionError("requests or KV blocks still held after the fuzz run")


def test_fuzz_api_from_its_openapi_schema(small_pool_replica) -> None:
    url = small_pool_replica.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health"} <= labels
    stats: dict = {}
    started = time.monotonic()
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            fuzz_operation(url, op, mode, stats)
    print(f"fuzzed in {time.monotonic() - started:.1f}s: {stats}")
    # generation was really exercised, and schema-invalid bodies were refused
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert stats[f"{label} positive"].get(200, 0) >= 3, stats
        assert {k for k in stats[f"{label} negative"] if isinstance(k, int)} <= {400, 404, 413}, stats

    assert httpx.get(url + "/health", timeout=10).status_code == 200
    wait_idle(small_pool_replica)
    assert small_pool_replica.metric("neo:worker_up") == 1
    out = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                    "max_tokens": 3, "temperature": 0}, timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1


# Found by fuzzing; each once broke the server. (body, status, param)
REGRESSIONS = [
    # top_k past int32 overflowed the iteration plan inside the engine loop: the loop died silently and
    # every later request waited forever while /health said 200
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "top_k": 10**30}, 200, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "top_k": 2**31}, 200, None),
    # lone surrogate escapes are valid JSON but not text: the tokenizer raised (500), and an error
    # message echoing one could not be encoded (500)
    ({"model": MODEL, "prompt": "\x00\ud800", "max_tokens": 2}, 400, "prompt"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "\udc00x"}], "max_tokens": 2}, 400, "messages"),
    ({"model": "x\ud800", "prompt": "hi", "max_tokens": 2}, 404, "model"),
    # lax coercion accepted what the schema forbids: 0 as a boolean, "2" as an integer, true as a token id
    ({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": 0}}, 400,
     "stream_options.include_usage"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "2"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [True, False], "max_tokens": 2}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", REGRESSIONS)
def test_inputs_found_by_fuzzing(small_pool_replica, body, status, param) -> None:
    url = small_pool_replica.url
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    resp = httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert resp.json()["error"]["param"] == param, resp.text
    after = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
                       timeout=REQUEST_TIMEOUT_S)
    assert after.status_code == 200, after.text
    wait_idle(small_pool_replica)
