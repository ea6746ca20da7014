"""Grammar compilation for the gateway: once per distinct spec, off the event loop, LRU-cached."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import llguidance

from neo_gateway.param_error import ParamError
from neo_gateway.structured_output.request import StructuredOutputRequest
from neo_gateway.structured_output.spec import StructuredOutputKind, StructuredOutputSpec
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CACHE_SIZE = 256   # compiled grammars kept (vLLM's xgrammar backend keeps a similar bounded cache)


class StructuredOutputManager:
    """Turns specs into per-sequence matchers.

    - ``vocab_size``: the model's vocabulary (the worker's logits width), bound when a worker
      reports ready (:meth:`bind_vocab`); token ids the tokenizer lacks are never allowed.
    - ``_ll_tokenizer``: llguidance's view of the tokenizer, built once on the compile thread
      (about a second for a 50k vocabulary) and rebuilt only if the vocabulary changes.
    - ``_compiled``: spec -> a pristine compiled matcher, least recently used first; a sequence
      gets a deep copy (the compiled grammar is shared, the parse state is its own).
    - ``_pending``: specs being compiled now, so concurrent requests with one spec compile it once.
    - ``_pool``: the compile threads (half the cores, as vLLM: compilation is CPU-bound and must
      never run on the event loop, where it would stall every stream).
    """

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int = 0, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()   # the tokenizer and the cache are touched by the compile threads
        self._compiled: collections.OrderedDict[StructuredOutputSpec, llguidance.LLMatcher] = collections.OrderedDict()
        self._pending: dict[StructuredOutputSpec, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2), "grammar-compile")

    def bind_vocab(self, vocab_size: int) -> None:
        with self._lock:
            if vocab_size != self.vocab_size:
                self.vocab_size = vocab_size
                self._ll_tokenizer = None
                self._compiled.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- compilation ----------------------------------------------------------------------------
    async def prepare(self, spec: StructuredOutputSpec) -> None:
        """Compile ``spec`` (on the compile threads) unless cached; ParamError naming its field if
        it is invalid."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return
        pending = self._pending.get(spec)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._pool, self._compile, spec)
            self._pending[spec] = pending
            pending.add_done_callback(lambda _f, s=spec: self._pending.pop(s, None))
        await asyncio.shield(pending)

    def request_for(self, spec: StructuredOutputSpec) -> StructuredOutputRequest:
        """A fresh matcher at the grammar's start (compiled here if it left the cache meanwhile)."""
        with self._lock:
            template = self._compiled.get(spec)
        if template is None:
            template = self._compile(spec)
        return StructuredOutputRequest(template.deep_copy(), self.vocab_size)

    def _compile(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher:
        tokenizer = self._tokenizer()
        missing = self._unwritable(spec)
        if missing:   # the grammar could force bytes no token holds: llguidance's masks then go astray
            raise ParamError(spec.param, f"{spec.param}: the character {missing!r} (U+{ord(missing):04X}) cannot "
                                         "be written with this model's vocabulary")
        try:   # the library's own exceptions too: whatever it cannot read is the request's fault
            grammar = _grammar_text(spec)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            matcher = None if is_error else llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except Exception as exc:  # noqa: BLE001
            raise ParamError(spec.param, f"{spec.param}: invalid {spec.kind.value}: {_first_line(str(exc))}") from None
        if matcher is None or matcher.is_error():
            why = messages[0] if matcher is None else matcher.get_error()
            raise ParamError(spec.param, f"{spec.param}: invalid {spec.kind.value}: {_first_line(why)}")
        with self._lock:
            self._compiled[spec] = matcher
            self._compiled.move_to_end(spec)
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def _unwritable(self, spec: StructuredOutputSpec) -> str | None:
        """A character of the constraint's text that the tokenizer cannot encode and decode back (a
        byte-level vocabulary may lack rare lead bytes), or None. Strict: such a character is refused
        wherever it appears, also where the grammar would not force it."""
        text = spec.text
        if spec.kind in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT, StructuredOutputKind.CHOICE,
                         StructuredOutputKind.STRUCTURAL_TAG):
            text = json.dumps(json.loads(text), ensure_ascii=False)
        for ch in sorted({c for c in text if ord(c) > 127}):
            if self.tokenizer.decode(self.tokenizer.encode(ch, add_special_tokens=False)) != ch:
                return ch
        return None

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                if not self.vocab_size:
                    raise RuntimeError("structured outputs need the model's vocabulary size (no worker yet)")
                n_vocab = max(self.vocab_size, self.tokenizer.vocab_size)
                self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=n_vocab,
                                                            eos_token=list(self.tokenizer.eos_token_ids) or None)
                log.info("structured outputs: llguidance tokenizer over %d tokens", n_vocab)
            return self._ll_tokenizer


def _grammar_text(spec: StructuredOutputSpec) -> str:
    """llguidance's grammar for ``spec`` (raises ValueError on text it cannot read)."""
    if spec.kind in (StructuredOutputKind.JSON, StructuredOutputKind.JSON_OBJECT):
        # no free whitespace unless asked: the fixed separators keep a small model from spending its
        # tokens on indentation (vLLM's disable_any_whitespace)
        options = ({"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
                   if spec.whitespace_pattern else {"whitespace_flexible": False})
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=options)
    if spec.kind is StructuredOutputKind.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind is StructuredOutputKind.CHOICE:
        # the strings as Lark literals in plain UTF-8: llguidance's own choice helper escapes astral
        # characters as surrogate pairs, which its masks and its parser then read differently
        choices = json.loads(spec.text)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    if spec.kind is StructuredOutputKind.STRUCTURAL_TAG:
        return llguidance.LLMatcher.grammar_from_lark(_structural_tag_lark(json.loads(spec.text)))
    return llguidance.grammar_from("grammar", spec.text)   # GBNF/EBNF (llama.cpp's) or Lark


def _structural_tag_lark(tag: dict) -> str:
    """llguidance's own structural tags (lazy triggers in free text), each schema's JSON written
    without free whitespace as the other JSON constraints are (unless the schema says otherwise)."""
    tags = []
    for item in tag["structures"]:
        schema = item["schema"]
        if isinstance(schema, dict) and "x-guidance" not in schema:
            schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        trigger = next(t for t in tag["triggers"] if item["begin"].startswith(t))
        tags.append(llguidance.StructTag(trigger=trigger, begin=item["begin"], grammar=schema, end=item["end"]))
    return llguidance.StructTag.to_grammar(tags)


def _first_line(message: str) -> str:
    """The compiler's message on one line (its first lines name the problem), bounded."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return " ".join(lines[:4])[:500] if lines else "rejected by the grammar compiler"
