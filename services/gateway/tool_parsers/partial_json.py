"""Tool-call JSON as far as it has been written: where each call object starts and ends, its
``name`` once that string is complete, and the span of its arguments value, so that a stream can
send the name first and then the arguments' JSON text piece by piece as the model writes it.

The scanner only tracks what it needs (strings, brackets, the top-level keys of a call object);
whether a finished call is valid JSON is still decided by ``json`` (the parsers' ``extract``).
"""

from __future__ import annotations

import dataclasses
import json
import re

from neo_gateway.tool_parsers.base import CallDraft

# A whole JSON string, a bracket, or (last) a lone quote: the start of a string not closed yet.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|"', re.DOTALL)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_PRIMITIVE = re.compile(r"[-+0-9.eEa-zA-Z]+")
_SPACE = re.compile(r"\s*")


def value_end(text: str, at: int) -> int | None:
    """End offset of the JSON value starting at ``text[at]``; None while it may still go on."""
    first = text[at]
    if first == '"':
        m = _STRING.match(text, at)
        return m.end() if m else None
    if first in "{[":
        depth = 0
        for m in _TOKENS.finditer(text, at):
            tok = m.group()
            if tok == '"':
                return None   # a string still open
            if tok in "{[":
                depth += 1
            elif tok in "}]":
                depth -= 1
                if depth == 0:
                    return m.end()
        return None
    m = _PRIMITIVE.match(text, at)
    end = m.end() if m else at + 1
    return end if end < len(text) else None   # a number may still grow


@dataclasses.dataclass
class PartialCall:
    """One call object (``{"name": ..., "arguments": {...}}``) in ``text[start:]`` as far as written.

    - ``name``: the name once its string is complete; ``args_start``/``args_end``: the arguments
      value's span (``args_end`` None while it is open); ``end``: just after the closing brace
      (None while open); ``broken``: not the shape of a call (it can only be text, or garbage).
    """

    start: int
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None
    broken: bool = False

    def arguments(self, text: str) -> str:
        """The arguments' JSON text written so far: an object's own text (growing while it is
        open), a JSON-string argument decoded once complete, ``{}`` for none; else ''."""
        if self.args_start is None:
            return "{}" if self.end is not None else ""
        first = text[self.args_start]
        if first == "{":
            return text[self.args_start:self.args_end if self.args_end is not None else len(text)]
        if self.args_end is None:
            return ""
        raw = text[self.args_start:self.args_end]
        if first == '"':
            return json.loads(raw)
        return "{}" if raw == "null" else ""


def scan_object(text: str, start: int, args_keys: tuple[str, ...]) -> PartialCall:
    """Scan the call object whose ``{`` is at ``text[start]``; its arguments are the value of the
    first of ``args_keys`` present."""
    call = PartialCall(start)
    at, key, expect, rank = start + 1, None, "key", len(args_keys)
    while True:
        at = _SPACE.match(text, at).end()
        if at >= len(text):
            return call
        c = text[at]
        if expect == "key":
            if c == "}":
                call.end = at + 1
                return call
            m = _STRING.match(text, at) if c == '"' else None
            if m is None:
                call.broken = c != '"'
                return call
            key, at, expect = json.loads(m.group()), m.end(), ":"
        elif expect == ":":
            if c != ":":
                call.broken = True
                return call
            at, expect = at + 1, "value"
        elif expect == "value":
            end = value_end(text, at)
            if key in args_keys and args_keys.index(key) <= rank:   # the first key listed wins, as in extract
                call.args_start, call.args_end, rank = at, end, args_keys.index(key)
            if end is None:
                return call
            if key == "name":
                call.name = json.loads(text[at:end]) if c == '"' else None
            at, expect = end, ","
        else:
            if c == "}":
                call.end = at + 1
                return call
            if c != ",":
                call.broken = True
                return call
            at, expect = at + 1, "key"


def scan_sequence(text: str, at: int, args_keys: tuple[str, ...], separators: str) -> list[PartialCall]:
    """Call objects one after another from ``text[at]`` (a ``{``), separated by whitespace and
    ``separators`` (``;`` for Llama 3's, ``,`` in an array)."""
    calls = []
    while at < len(text) and text[at] == "{":
        call = scan_object(text, at, args_keys)
        calls.append(call)
        if call.end is None or call.broken:
            break
        at = call.end
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
    return calls


def drafts_of(text: str, calls: list[PartialCall]) -> list[CallDraft]:
    """The drafts of ``calls`` up to the first that is not the shape of a call."""
    out = []
    for call in calls:
        if call.broken:
            break
        out.append(CallDraft(call.name, call.arguments(text)))
    return out
