"""fast_json: orjson's bytes decode to the same values the standard library's encoding did, and
what orjson refuses (lone surrogates, integers beyond 64 bits) takes the standard library's path."""

import json

import pytest

from neo_gateway.fast_json import FastJSONResponse, sse_event, orjson

VALUES = [
    {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "naïve 日本語 🤖 \"q\" \\ \n\t\x00"},
                                      "logprobs": None, "finish_reason": None}]},
    {"logprobs": {"content": [{"token": " é", "logprob": -9999.0, "bytes": [32, 195, 169],
                               "top_logprobs": [{"token": "x", "logprob": -1.25e-7, "bytes": [120]}]}]}},
    {"usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}, "choices": []},
]
REFUSED_BY_ORJSON = [{"arguments": '{"a": "\ud800"}'}, {"n": 2 ** 70}]


def _event_value(event: bytes):
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[len(b"data: "):-2])


def test_orjson_is_installed():
    assert orjson is not None, "orjson is a serving dependency (pyproject.toml)"


@pytest.mark.parametrize("value", VALUES + REFUSED_BY_ORJSON)
def test_sse_event_carries_the_same_value(value):
    assert _event_value(sse_event(value)) == json.loads(json.dumps(value))


@pytest.mark.parametrize("value", REFUSED_BY_ORJSON)
def test_what_orjson_refuses_is_encoded_as_before(value):
    with pytest.raises(TypeError):
        orjson.dumps(value)
    assert sse_event(value) == f"data: {json.dumps(value)}\n\n".encode()


@pytest.mark.parametrize("value", VALUES + REFUSED_BY_ORJSON + [{"function": {"name": "get\ud800"}}])
def test_response_body_is_the_same_value(value):
    """Also what orjson refuses: a lone surrogate (Starlette's own render raises on it) is escaped."""
    assert json.loads(FastJSONResponse(value).body) == value
