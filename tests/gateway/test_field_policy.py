"""Every request field has a status (honoured, no effect by design, refused), so none is silently
dropped; the committed field lists cover the ``openai`` client's request types; the README table is
generated from the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai.types import completion_create_params as openai_completions
from openai.types.chat import chat_completion_stream_options_param as openai_stream_options
from openai.types.chat import completion_create_params as openai_chat
from pydantic import BaseModel

from neo_gateway import api_fields
from neo_gateway.api_fields import Endpoint, FieldStatus, check_refused, status, unknown_fields
from neo_gateway.api_models import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions
from neo_gateway.param_error import ParamError

MODELS = [(CompletionRequest, Endpoint.COMPLETIONS), (ChatCompletionRequest, Endpoint.CHAT),
          (ChatMessage, Endpoint.CHAT), (StreamOptions, Endpoint.CHAT), (StreamOptions, Endpoint.COMPLETIONS)]


def _models_under(model: type[BaseModel]) -> set[type[BaseModel]]:
    """``model`` and every pydantic model reachable through its fields' annotations."""
    seen, todo = set(), [model]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for field in m.model_fields.values():
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack.extend(getattr(t, "__args__", ()))
    return seen


def test_the_walk_finds_every_nested_request_model():
    assert _models_under(ChatCompletionRequest) == {ChatCompletionRequest, ChatMessage, StreamOptions}
    assert _models_under(CompletionRequest) == {CompletionRequest, StreamOptions}


@pytest.mark.parametrize("root,endpoint", [(CompletionRequest, Endpoint.COMPLETIONS),
                                           (ChatCompletionRequest, Endpoint.CHAT)])
def test_every_declared_field_is_honoured_or_refused_or_without_effect(root, endpoint):
    missing = [f"{m.__name__}.{name}" for m in _models_under(root) for name in m.model_fields
               if status(endpoint, name) is None]
    assert not missing, f"fields with no status in api_fields (they would be silently dropped): {missing}"


@pytest.mark.parametrize("model,fields", [
    (CompletionRequest, api_fields.schema_fields(Endpoint.COMPLETIONS)),
    (ChatCompletionRequest, api_fields.schema_fields(Endpoint.CHAT)),
    (ChatMessage, api_fields.MESSAGE_FIELDS), (StreamOptions, api_fields.STREAM_OPTIONS_FIELDS)])
def test_every_schema_field_is_declared(model, fields):
    """A schema field left undeclared would be taken as unknown: ignored with a warning."""
    assert set(fields) <= set(model.model_fields), set(fields) - set(model.model_fields)


@pytest.mark.parametrize("typed,ours", [
    (openai_completions.CompletionCreateParamsBase, api_fields.OPENAI_COMPLETIONS),
    (openai_chat.CompletionCreateParamsBase, api_fields.OPENAI_CHAT),
    (openai_stream_options.ChatCompletionStreamOptionsParam, api_fields.STREAM_OPTIONS_FIELDS)])
def test_the_committed_lists_cover_the_openai_clients_request_types(typed, ours):
    """A newer ``openai`` client with a new request field fails here until the field has a status."""
    assert set(typed.__annotations__) <= set(ours), set(typed.__annotations__) - set(ours)


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 **fields})


@pytest.mark.parametrize("fields", [
    {"repetition_penalty": 1.0}, {"repetition_penalty": 1}, {"min_p": 0}, {"tool_choice": "none"},
    {"tool_choice": "auto"}, {"tools": []}, {"response_format": {"type": "text"}}, {"best_of": 1},
    {"logprobs": False}, {"top_logprobs": 0}, {"n": 3, "best_of": 3}, {"store": False},
    {"logit_bias": {}}, {"service_tier": "auto"}, {"user": "u"}, {"metadata": {"a": "b"}},
    {"stream_options": {"include_usage": True, "include_obfuscation": False}}])
def test_values_that_ask_for_the_default_are_accepted(fields):
    assert check_refused(_chat(**fields), Endpoint.CHAT) is None


@pytest.mark.parametrize("fields,param", [
    ({"length_penalty": 1.2}, "length_penalty"), ({"length_penalty": True}, "length_penalty"),
    ({"allowed_token_ids": [3]}, "allowed_token_ids"), ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"bad_words": ["x"]}, "bad_words"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages.0.refusal")])
def test_other_values_are_refused_naming_the_field(fields, param):
    body = _chat(**fields)
    found = check_refused(body, Endpoint.CHAT)
    assert found is not None and found[0] == param
    with pytest.raises(ParamError) as err:
        body.check_supported()
    assert err.value.param == param and "not supported" in str(err.value)


def test_logprobs_zero_asks_for_the_sampled_tokens_logprob_on_completions():
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 0})
    assert check_refused(body, Endpoint.COMPLETIONS) is None
    assert body.sampling_params(16).logprobs == 0


@pytest.mark.parametrize("fields,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"n": 1, "best_of": 2, "stream": True}, "best_of"), ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs")])
def test_logprob_limits_are_refused_naming_the_field(fields, param):
    with pytest.raises(ParamError) as err:
        _chat(**fields).check_supported()
    assert err.value.param == param


def test_logprobs_above_twenty_are_refused_on_completions():
    with pytest.raises(ParamError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 21}).check_supported()
    assert err.value.param == "logprobs"


def test_logprob_fields_become_sampling_params():
    chat = _chat(logprobs=True, top_logprobs=3, prompt_logprobs=2).sampling_params(16)
    assert (chat.logprobs, chat.prompt_logprobs) == (3, 2)
    assert _chat(logprobs=False, top_logprobs=0).sampling_params(16).logprobs is None
    assert _chat(n=2, best_of=4).sampling_params(16).logprobs == 0   # ranking needs the sampled token's
    echo = CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True, "logprobs": 2})
    assert (echo.sampling_params(16).logprobs, echo.sampling_params(16).prompt_logprobs) == (2, 2)


def test_unknown_fields_are_collected_with_their_path():
    body = _chat(foo=1, messages=[{"role": "user", "content": "x", "bar": 2}], stream_options={"baz": 3})
    assert sorted(unknown_fields(body)) == ["foo", "messages.0.bar", "stream_options.baz"]
    assert status(Endpoint.CHAT, "foo") is None
    assert status(Endpoint.CHAT, "user") is FieldStatus.NO_EFFECT


def test_readme_table_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert api_fields.BEGIN in readme, "README.md lacks the OpenAI API fields table"
    table = readme.split(api_fields.BEGIN, 1)[1].split(api_fields.END, 1)[0].strip()
    assert table == api_fields.markdown_table(), \
        "regenerate: python -c 'from neo_gateway.api_fields import markdown_table; print(markdown_table())'"
