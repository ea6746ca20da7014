"""vLLM's structural tags (``response_format`` ``structural_tag``, the chat ``structural_tag`` field,
``structured_outputs.structural_tag``): read into one spec, malformed ones a 400 naming the field,
compiled with llguidance into free text in which a trigger forces ``begin``, JSON of the schema and
``end``; checked on the embedded model's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.api_models import ChatCompletionRequest
from neo_gateway.param_error import ParamError
from neo_gateway.structured_output import (StructuredOutputKind, StructuredOutputManager, fill_bitmasks,
                                           spec_from_fields, unpack_bitmask)
from neo_gateway.tokenizer import TextTokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}
TAG = {"structures": [{"begin": "<function=get_weather>", "schema": SCHEMA, "end": "</function>"}],
       "triggers": ["<function="]}


@pytest.fixture(scope="module")
def manager():
    m = StructuredOutputManager(TextTokenizer.from_gguf(embedded_gguf_path()), 49152)
    yield m
    m.close()


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "structural_tag", **TAG}}, "response_format"),
    ({"structural_tag": json.dumps(TAG)}, "structural_tag"),
    ({"structured_outputs": {"structural_tag": json.dumps(TAG)}}, "structured_outputs.structural_tag")])
def test_every_form_becomes_one_spec(fields, param):
    spec = spec_from_fields(fields)
    assert spec.kind is StructuredOutputKind.STRUCTURAL_TAG and spec.param == param
    assert json.loads(spec.text) == TAG


def test_the_chat_request_reads_the_structural_tag_field():
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "structural_tag": json.dumps(TAG)})
    body.check_supported()
    assert body.structured_output_spec().kind is StructuredOutputKind.STRUCTURAL_TAG


@pytest.mark.parametrize("tag", [
    "{not json", [], {"structures": TAG["structures"]}, {"triggers": ["<f"], "structures": []},
    {"triggers": ["<x="], "structures": TAG["structures"]},   # begin does not start with a trigger
    {"triggers": ["<function="], "structures": [{"begin": "<function=f>", "end": "</function>"}]},
    {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f"], "tags": []}}])
def test_malformed_tags_name_the_field(tag):
    with pytest.raises(ParamError) as err:
        spec_from_fields({"response_format": {"type": "structural_tag", **tag} if isinstance(tag, dict) else tag})
    assert err.value.param == "response_format"
    with pytest.raises(ParamError) as err:
        spec_from_fields({"structural_tag": tag if isinstance(tag, str) else json.dumps(tag)})
    assert err.value.param == "structural_tag"


def _feed(manager, spec, text):
    """Feed ``text``'s tokens; returns the matcher and whether every token was accepted."""
    req = manager.request_for(spec)
    tok = manager.tokenizer
    return req, all(req.accept(t) for t in tok.encode(text, add_special_tokens=False))


def test_free_text_then_a_trigger_forces_the_structure(manager):
    spec = spec_from_fields({"response_format": {"type": "structural_tag", **TAG}})
    # free text, then a call, then free text again
    req, ok = _feed(manager, spec, 'Sure. <function=get_weather>{"city":"Paris"}</function> Done.')
    assert ok, req.error
    # after the trigger only the structure's begin may follow, then JSON of the schema
    req, ok = _feed(manager, spec, "Sure. <function=")
    assert ok
    allowed = np.flatnonzero(unpack_bitmask(fill_bitmasks([req]), 49152)[0])
    texts = {manager.tokenizer.decode([int(t)]) for t in allowed}
    assert texts and all("get_weather>".startswith(t) for t in texts), sorted(texts)[:10]
    _, ok = _feed(manager, spec, 'Sure. <function=get_weather>{"town":"Paris"}</function>')
    assert not ok, "JSON outside the schema is refused after the trigger"
    _, ok = _feed(manager, spec, "No call at all, just <b>text</b>.")
    assert ok, "without a trigger the text is free"
