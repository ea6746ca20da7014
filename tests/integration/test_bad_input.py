"""Hostile and mistaken input over real HTTP: a 4xx with an OpenAI-shaped body naming the field,
while a request already in flight completes exactly as it would alone."""

from __future__ import annotations

import threading

import httpx
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

# (path, body, status, param, words expected in the message)
CASES = [
    (COMP, {"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
    (COMP, {"prompt": "x"}, 400, "model", "required"),
    (COMP, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    (COMP, {"model": MODEL, "prompt": "hello", "max_tokens": 600}, 400, "max_tokens", "maximum context length is 512"),
    (COMP, {"model": MODEL, "prompt": "word " * 600}, 400, "prompt", "maximum context length"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages",
     "maximum context length"),
    (COMP, {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    (COMP, {"model": MODEL, "prompt": "x", "top_p": 2}, 400, "top_p", "less than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "top_k": -5}, 400, "top_k", "greater than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "seed": -3}, 400, "seed", "greater than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "n": 1000}, 400, "n", "less than or equal"),
    (COMP, {"model": MODEL, "prompt": "x", "stop": ["s"] * 17}, 400, "stop", "at most 16"),
    (COMP, {"model": MODEL, "prompt": [1, 2, 999999]}, 400, "prompt", "token ids"),
    (COMP, {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "system"),
    (CHAT, {"model": MODEL, "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
]


def check_error(resp: httpx.Response, status: int, param: str | None, words: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err["message"]


@pytest.fixture(scope="module")
def url(small_pool_replica):
    return small_pool_replica.url


def test_each_bad_request_gets_a_named_4xx_and_in_flight_work_is_undisturbed(url):
    body = {"model": MODEL, "prompt": "A long story about a lighthouse keeper:", "temperature": 0, "max_tokens": 40}
    alone = httpx.post(url + COMP, json=body, timeout=300).json()["choices"][0]["text"]
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(httpx.post(url + COMP, json=body, timeout=300).json()))
    t.start()
    for path, payload, status, param, words in CASES:
        check_error(httpx.post(url + path, json=payload, timeout=60), status, param, words)
    t.join(timeout=300)
    assert result["choices"][0]["text"] == alone


def test_malformed_json_and_non_utf8_bodies(url):
    headers = {"content-type": "application/json"}
    check_error(httpx.post(url + COMP, content=b'{"model": "x", "prompt": ', headers=headers), 400, "body", "JSON")
    bad = b'{"model": "' + MODEL.encode() + b'", "prompt": "caf\xe9 \xff\xfe"}'
    resp = httpx.post(url + COMP, content=bad, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_refused_before_reading(url):
    resp = httpx.post(url + COMP, content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"})
    check_error(resp, 413, "body", "exceeds")


def test_unknown_route_is_openai_shaped_404(url):
    resp = httpx.get(url + "/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()
