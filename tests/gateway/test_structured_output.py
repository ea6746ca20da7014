"""Structured outputs on the gateway: the API fields read into one spec (400s naming the field),
grammars compiled once per spec off the event loop and LRU-cached, matchers per sequence, and the
scheduler's launch-ahead holding a constrained request back until its previous token is known."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from neo_common.config import SchedulerConfig
from neo_common.model_source import embedded_gguf_path
from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager
from neo_gateway.param_error import ParamError
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import FinishReason, Sequence
from neo_gateway.structured_output import (StructuredOutputKind, StructuredOutputManager, spec_from_fields,
                                           unpack_bitmask)
from neo_gateway.tokenizer import TextTokenizer

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}}, "required": ["b"]}


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_gguf(embedded_gguf_path())


@pytest.mark.parametrize("fields,kind,param", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputKind.JSON_OBJECT, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredOutputKind.JSON, "response_format"),
    ({"guided_json": SCHEMA}, StructuredOutputKind.JSON, "guided_json"),
    ({"guided_json": '{"type": "object"}'}, StructuredOutputKind.JSON, "guided_json"),
    ({"guided_regex": "a+"}, StructuredOutputKind.REGEX, "guided_regex"),
    ({"guided_choice": ["a", "b"]}, StructuredOutputKind.CHOICE, "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputKind.GRAMMAR, "guided_grammar"),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputKind.REGEX, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputKind.JSON_OBJECT, "structured_outputs.json_object"),
    ({"response_format": {"type": "text"}, "guided_choice": ["a"]}, StructuredOutputKind.CHOICE, "guided_choice")])
def test_each_field_becomes_one_spec(fields, kind, param):
    spec = spec_from_fields(fields)
    assert spec.kind is kind and spec.param == param


def test_a_schema_keeps_its_property_order_and_free_text_is_no_spec():
    assert list(__import__("json").loads(spec_from_fields({"guided_json": SCHEMA}).text)["properties"]) == ["b", "a"]
    assert spec_from_fields({"response_format": {"type": "text"}}) is None
    assert spec_from_fields({"structured_outputs": {"json_object": False}}) is None
    assert spec_from_fields({}) is None


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"format": "json"}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"), ({"guided_json": [1]}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"guided_whitespace_pattern": 3}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs.backend"),
    ({"structured_outputs": {"regex": "a", "_backend": "outlines"}}, "structured_outputs._backend"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": "no"}},
     "structured_outputs.disable_any_whitespace")])
def test_malformed_fields_name_themselves(fields, param):
    with pytest.raises(ParamError) as err:
        spec_from_fields(fields)
    assert err.value.param == param


NESTED = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"const": {"x": 1}}}},
                                          "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                          "e": {"type": "object", "additionalProperties": True}}}


def test_structured_outputs_options_are_honoured_not_dropped(tok):
    """vLLM's options inside ``structured_outputs``: each has its effect (none silently ignored)."""
    json_ = __import__("json")
    plain = spec_from_fields({"structured_outputs": {"json": NESTED}})
    assert plain.whitespace_pattern is None and "additionalProperties" not in json_.loads(plain.text)
    same = spec_from_fields({"structured_outputs": {"json": NESTED, "disable_any_whitespace": True, "backend": "auto",
                                                    "disable_fallback": True, "_backend_was_auto": True}})
    assert same == plain   # what this server does anyway: one backend, no free whitespace
    spaced = spec_from_fields({"structured_outputs": {"json": NESTED, "disable_any_whitespace": False}})
    assert spaced.whitespace_pattern and spaced != plain
    closed = json_.loads(spec_from_fields({"structured_outputs": {"json": NESTED,
                                                                  "disable_additional_properties": True}}).text)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["e"]["additionalProperties"] is True              # said explicitly: kept
    assert closed["properties"]["a"]["properties"]["b"] == {"const": {"x": 1}}    # values, not schemas
    manager = StructuredOutputManager(tok, tok.vocab_size)
    try:   # the matchers differ: free whitespace is allowed after "{" only when asked for
        tight, loose = (manager.request_for(spec) for spec in (plain, spaced))
        space = tok.encode(" ", add_special_tokens=False)[0]
        assert tight.accept(tok.encode("{", add_special_tokens=False)[0])
        assert loose.accept(tok.encode("{", add_special_tokens=False)[0])
        assert loose.accept(space) and not tight.accept(space)
        strict = manager.request_for(spec_from_fields({"structured_outputs": {
            "json": {"type": "object", "properties": {"a": {"type": "integer"}}}, "disable_additional_properties": True}}))
        for t in tok.encode('{"', add_special_tokens=False):
            assert strict.accept(t)
        assert not strict.accept(tok.encode("z", add_special_tokens=False)[0])   # only "a" may follow
    finally:
        manager.close()


class CountingManager(StructuredOutputManager):
    """The real manager, noting on which thread each compilation ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compiled_on: list[str] = []

    def _compile(self, spec):
        self.compiled_on.append(threading.current_thread().name)
        return super()._compile(spec)


def test_a_spec_compiles_once_off_the_event_loop_and_the_cache_is_lru(tok):
    manager = CountingManager(tok, tok.vocab_size, cache_size=2)
    specs = [spec_from_fields({"guided_regex": f"[a-c]{{{i}}}"}) for i in (1, 2, 3)]

    async def go():
        await asyncio.gather(*(manager.prepare(specs[0]) for _ in range(8)))   # concurrent: compiled once
        await manager.prepare(specs[1])
        await manager.prepare(specs[0])                                        # a hit: now the newest
        await manager.prepare(specs[2])                                        # evicts specs[1]
        return threading.current_thread().name

    loop_thread = asyncio.run(go())
    assert len(manager.compiled_on) == 3
    assert loop_thread not in manager.compiled_on and all(n.startswith("grammar-compile") for n in manager.compiled_on)
    assert list(manager._compiled) == [specs[0], specs[2]]
    manager.request_for(specs[1])   # left the cache: compiled again, here
    assert len(manager.compiled_on) == 4
    manager.close()


@pytest.mark.parametrize("fields,param", [({"guided_regex": "(a"}, "guided_regex"),
                                          ({"guided_json": {"type": "strin"}}, "guided_json"),
                                          ({"guided_grammar": "root ::= (("}, "guided_grammar"),
                                          ({"response_format": {"type": "json_schema", "json_schema": {
                                              "name": "n", "schema": {"type": "object", "required": 5}}}},
                                           "response_format")])
def test_an_invalid_grammar_is_a_param_error_naming_its_field(tok, fields, param):
    manager = StructuredOutputManager(tok, tok.vocab_size)
    with pytest.raises(ParamError) as err:
        asyncio.run(manager.prepare(spec_from_fields(fields)))
    assert err.value.param == param and "invalid" in str(err.value)
    manager.close()


def test_each_sequence_advances_its_own_matcher_to_the_end(tok):
    manager = StructuredOutputManager(tok, tok.vocab_size)
    spec = spec_from_fields({"guided_choice": ["yes", "no"]})
    a, b = manager.request_for(spec), manager.request_for(spec)
    for token in tok.encode("yes", add_special_tokens=False):
        assert a.accept(token)
    assert a.terminated and not b.terminated
    allowed = np.flatnonzero(unpack_bitmask(__import__("neo_gateway.structured_output", fromlist=["x"])
                                            .fill_bitmasks([b]), tok.vocab_size)[0])
    assert {tok.decode([int(t)]) for t in allowed} <= {"y", "ye", "yes", "n", "no"}
    assert not b.accept(tok.encode(" maybe", add_special_tokens=False)[0]) and b.error
    manager.close()


# -- the scheduler ---------------------------------------------------------------------------------
def token_for(seq: Sequence, position: int, allowed: np.ndarray | None) -> int:
    """A deterministic 'model' (2 is EOS): a token of the request and the position; for a
    constrained row, one its mask allows."""
    if allowed is not None:
        ids = np.flatnonzero(allowed)
        return int(ids[(seq.seq_id * 7 + position) % len(ids)])
    return 2 if (seq.seq_id * 7 + position) % 23 == 0 else 100 + (seq.seq_id + position) % 50


def test_constrained_requests_run_ahead_with_masks_that_follow_and_get_the_synchronous_tokens(tok):
    """Async scheduling as the engine drives it: a plan scheduled ahead holds constrained rows as
    placeholders with ``bitmask_deferred``; their masks (``grammar_bitmask``) are taken once the
    previous plan's tokens advanced the grammars, and every request gets the tokens the synchronous
    schedule gives it. A request that ended meanwhile gets an all-ones mask (its row is discarded)."""
    manager = StructuredOutputManager(tok, tok.vocab_size)
    words = ["alpha", "beta", "gamma delta"]
    spec = spec_from_fields({"guided_choice": words})
    width = (tok.vocab_size + 31) // 32

    def run(async_: bool):
        sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256), BlockManager(64, 16, Place.GPU))
        seqs = [Sequence(i, f"r{i}", list(range(5, 15 + i)), SamplingParams(max_tokens=16 if i % 3 == 0 else 6 + i % 5),
                         eos_token_ids=(2,), max_model_len=512) for i in range(10)]
        for s in seqs:
            if s.seq_id % 3 == 0:
                s.structured = manager.request_for(spec)
            sched.add(s)
        in_flight, counts = [], {"ahead": 0, "deferred": 0, "ended": 0}   # (output, its plan's masks)

        def send(out):
            plan = out.to_plan(sched.gpu)
            plan.check()
            want = [i for i, r in enumerate(out.rows) if r.sample and r.seq.structured is not None]
            assert plan.bitmask_rows.tolist() == want and out.bitmask_deferred == plan.bitmask_deferred
            if plan.bitmask_deferred:
                assert all(out.rows[i].placeholder for i in want) and plan.bitmask.shape == (0, 0)
                counts["deferred"] += 1
            else:
                assert not want or (plan.bitmask.shape[1] == width and len(plan.bitmask_index) == len(want))
            in_flight.append([out, None if plan.bitmask_deferred else plan.bitmask[plan.bitmask_index]])

        while sched.has_work() or in_flight:
            if not in_flight:
                send(sched.schedule())
            if async_ and len(in_flight) == 1:
                ahead = sched.schedule_ahead(in_flight[0][0])
                if ahead is not None:
                    counts["ahead"] += 1
                    assert all(r.placeholder for r in ahead.rows)
                    send(ahead)
            current, bitmask = in_flight.pop(0)
            assert bitmask is not None, "a plan's masks are known before it samples"
            rows = [i for i, r in enumerate(current.rows) if r.sample and r.seq.structured is not None]
            masks = dict(zip(rows, unpack_bitmask(bitmask, tok.vocab_size)))
            sampled = {r.seq.seq_id: token_for(r.seq, r.start + r.num_tokens, masks.get(i))
                       for i, r in enumerate(current.rows) if r.sample}
            for seq, token, reason in sched.update(current, sampled):
                if seq.structured is not None:   # as the engine does
                    assert seq.structured.accept(token)
                    if seq.structured.terminated and reason is None:
                        sched.finish(seq, FinishReason.STOP)
            if in_flight and in_flight[0][0].bitmask_deferred:   # the engine's GrammarBitmask
                nxt = in_flight[0][0]
                masks, index = nxt.grammar_bitmask()
                in_flight[0][1] = masks[index]
                ended = [i for i, r in enumerate(nxt.constrained_rows) if r.seq.is_finished]
                assert (in_flight[0][1][ended] == -1).all()
                counts["ended"] += len(ended)
                masks, index = nxt.grammar_bitmask(allow_all=True)
                assert len(masks) == 1 and (masks == -1).all() and len(index) == len(nxt.constrained_rows)
        assert sched.gpu.num_free == 64
        done = [s for s in seqs if s.structured is not None and s.finish_reason is FinishReason.STOP]
        assert len(done) == 4 and all(tok.decode(s.output_ids) in words for s in done)
        return {s.request_id: (s.output_ids, s.finish_reason) for s in seqs}, counts

    want, _ = run(False)
    got, counts = run(True)
    assert got == want
    assert counts["ahead"] > 0 and counts["deferred"] > 0 and counts["ended"] > 0, counts
    manager.close()


def test_choices_are_written_exactly_and_unwritable_characters_are_refused(tok):
    manager = StructuredOutputManager(tok, tok.vocab_size)
    for word in ("café", 'a "quoted" \\ word', "日本"):
        r = manager.request_for(spec_from_fields({"guided_choice": ["x", word]}))
        for token in tok.encode(word, add_special_tokens=False):
            assert r.accept(token), (word, r.error)
        assert r.terminated
    # a character whose lead byte the byte-level vocabulary lacks: its grammar could force bytes no
    # token holds (found by the API fuzzer: llguidance then allowed a token it refused to accept)
    for fields in ({"guided_choice": ["=", "*\U00072e95"]}, {"guided_regex": "x\U00072e95"},
                   {"guided_json": {"enum": ["\U00072e95"]}}):
        with pytest.raises(ParamError) as err:
            asyncio.run(manager.prepare(spec_from_fields(fields)))
        assert err.value.param == next(iter(fields)) and "vocabulary" in str(err.value)
    manager.close()


def test_distinct_rows_rebuild_every_row_and_hold_no_duplicate():
    from neo_gateway.structured_output import distinct_rows

    rng = np.random.default_rng(5)
    states = rng.integers(-2**31, 2**31 - 1, (5, 40), dtype=np.int64).astype(np.int32)
    for picks in ([0] * 8, [0, 1, 0, 1, 2, 2, 4], list(range(5)), [3]):
        rows = states[picks]
        masks, index = distinct_rows(rows)
        assert np.array_equal(masks[index], rows)
        assert len(masks) == len(set(picks)) and index.dtype == np.int32
        assert int(index.max()) == len(masks) - 1
