"""Every refused request field, sent with a value other than its default through the official
``openai`` client (vLLM's fields in ``extra_body``) to a real replica, gets a 400 naming it; fields
of neither API get a 200 and one warning; honoured fields keep working."""

from __future__ import annotations

import inspect
import time

import openai
import pytest

from neo_gateway.api_fields import Endpoint, FieldStatus, schema_fields, status
from support.clients import openai_client

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
MSG = [{"role": "user", "content": "Say hello."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}

# a value that asks for something other than the default, per refused field
NON_DEFAULT = {
    "best_of": 2, "n": 2, "echo": True, "frequency_penalty": 0.5, "presence_penalty": -0.5,
    "logit_bias": {"17": 5}, "suffix": " the end", "use_beam_search": True, "min_p": 0.1,
    "repetition_penalty": 1.2, "length_penalty": 0.5, "include_stop_str_in_output": True, "min_tokens": 4,
    "skip_special_tokens": False, "spaces_between_special_tokens": False, "truncate_prompt_tokens": 4,
    "allowed_token_ids": [1, 2, 3], "prompt_logprobs": 1, "bad_words": ["hello"],
    "response_format": {"type": "json_object"}, "guided_json": {"type": "object"}, "guided_regex": "a+",
    "guided_choice": ["yes", "no"], "guided_grammar": 'root ::= "a"', "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ", "structured_outputs": {"regex": "a+"}, "structural_tag": "{}",
    "priority": 1, "logits_processors": ["some.module.Processor"], "return_tokens_as_token_ids": True,
    "cache_salt": "salt", "kv_transfer_params": {"do_remote_prefill": True}, "vllm_xargs": {"k": 1},
    "prompt_embeds": "AAAA", "audio": {"voice": "alloy", "format": "wav"}, "function_call": {"name": "f"},
    "functions": [{"name": "f", "parameters": {}}], "modalities": ["text", "audio"],
    "moderation": {"input": {"policy": "strict"}}, "prediction": {"type": "content", "content": "hello"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {"search_context_size": "low"},
    "store": True, "service_tier": "flex", "tool_choice": "required", "tools": [TOOL],
    "top_logprobs": 2, "continue_final_message": True, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": False},
    "mm_processor_kwargs": {"num_crops": 4},
}
LOGPROBS = {Endpoint.COMPLETIONS: 1, Endpoint.CHAT: True}


def refused(endpoint: Endpoint) -> list[str]:
    return [f for f in schema_fields(endpoint) if status(endpoint, f) is FieldStatus.REFUSED]


def cases():
    for endpoint in Endpoint:
        for field in refused(endpoint):
            yield pytest.param(endpoint, field, id=f"{endpoint.value}-{field}")


@pytest.fixture(scope="module")
def replica(small_pool_replica):
    return small_pool_replica


@pytest.fixture(scope="module")
def client(replica):
    return openai_client(replica.url, timeout=120)


def create(client: openai.OpenAI, endpoint: Endpoint, **fields):
    """A request through the client's own keyword for each OpenAI field, ``extra_body`` for the rest."""
    fn = client.completions.create if endpoint is Endpoint.COMPLETIONS else client.chat.completions.create
    known = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in fields.items() if k in known}
    extra = {k: v for k, v in fields.items() if k not in known}
    base = {"prompt": "Say hello."} if endpoint is Endpoint.COMPLETIONS else {"messages": MSG}
    kwargs = {"model": MODEL, "max_tokens": 4, "temperature": 0, **base, **kwargs}
    return fn(**kwargs, extra_body=extra or None)


def test_every_refused_field_has_a_test_value():
    for endpoint in Endpoint:
        assert set(refused(endpoint)) - {"logprobs"} <= set(NON_DEFAULT)


@pytest.mark.parametrize("endpoint,field", list(cases()))
def test_refused_field_with_a_non_default_value_gets_400_naming_it(client, endpoint, field):
    value = LOGPROBS[endpoint] if field == "logprobs" else NON_DEFAULT[field]
    with pytest.raises(openai.BadRequestError) as err:
        create(client, endpoint, **{field: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == field, err.value.body
    assert "not supported" in err.value.body["message"]


@pytest.mark.parametrize("endpoint", list(Endpoint))
@pytest.mark.parametrize("option", ["include_obfuscation", "continuous_usage_stats"])
def test_refused_stream_options_get_400_naming_them(client, endpoint, option):
    with pytest.raises(openai.BadRequestError) as err:
        create(client, endpoint, stream=True, stream_options={"include_usage": True, option: True})
    assert err.value.body["param"] == f"stream_options.{option}"


@pytest.mark.parametrize("field,value", [("refusal", "I cannot.")])
def test_refused_message_fields_get_400_naming_them(client, field, value):
    messages = [*MSG, {"role": "assistant", "content": "Hi.", field: value}, {"role": "user", "content": "More."}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert err.value.body["param"] == f"messages.1.{field}"


def test_fields_of_neither_api_are_ignored_with_one_warning(client, replica):
    before = open(replica.log_path, "rb").read().count(b"not in the OpenAI or vLLM API")
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello.", "x_mood": "happy"}], max_tokens=4,
        temperature=0, extra_body={"x_flavour": "vanilla", "x_volume": 11})
    assert out.choices[0].message.content is not None
    time.sleep(0.5)
    lines = [ln for ln in open(replica.log_path, "rb").read().splitlines() if b"not in the OpenAI or vLLM API" in ln]
    assert len(lines) == before + 1, lines
    assert all(name in lines[-1] for name in (b"x_flavour", b"x_volume", b"messages.0.x_mood"))


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_honoured_fields_and_default_values_keep_working(client, endpoint):
    """The honoured fields, and refused fields sent with their defaults, give the plain greedy text."""
    plain = create(client, endpoint, max_tokens=8)
    defaults = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                "min_p": 0.0, "logit_bias": {}, "min_tokens": 0, "skip_special_tokens": True,
                "include_stop_str_in_output": False, "priority": 0, "response_format": {"type": "text"},
                "user": "u-1", "top_k": -1, "top_p": 1.0, "seed": 7, "stop": ["\n\n\n"], "stop_token_ids": [],
                "ignore_eos": False, "request_id": "my-id-42"}
    if endpoint is Endpoint.CHAT:
        defaults |= {"tool_choice": "none", "tools": [], "logprobs": False, "top_logprobs": 0, "store": False,
                     "service_tier": "auto", "metadata": {"team": "a"}, "safety_identifier": "s",
                     "prompt_cache_key": "k", "parallel_tool_calls": True, "add_generation_prompt": True,
                     "add_special_tokens": False}
    else:
        defaults |= {"echo": False, "add_special_tokens": True}
    out = create(client, endpoint, max_tokens=8, **defaults)
    text = (lambda r: r.choices[0].text) if endpoint is Endpoint.COMPLETIONS else \
           (lambda r: r.choices[0].message.content)
    assert text(out) == text(plain)
    assert out.id.endswith("-my-id-42")
