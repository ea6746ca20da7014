"""Tool-call JSON as far as it has been written: where each call object starts and ends, its
``name`` once that string is complete, and the span of its arguments value, so that a stream can
send the name and then the arguments' JSON text piece by piece as the model writes it.

The scanner follows JSON's grammar strictly (strings without control characters and with valid
escapes only, literals and numbers as ``json`` reads them, matching brackets, no trailing commas), so
what it accepts ``json.loads`` accepts too. Where a call object names a key twice (or, for Llama 3,
both ``parameters`` and ``arguments``), the first value wins, here and in the parsers' ``extract``
(:func:`loads_first_wins`): a stream has sent the first before the second is written. It is resumable: :class:`ObjectScanner` keeps its state between calls and only reads
what was written since (a stream's text grows a few characters per step; rescanning it all each step
would cost quadratic time on the event loop).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re

from neo_gateway.tool_parsers.base import CallDraft

# The body of a JSON string up to its closing quote (or where the text ends): no control characters,
# only the escapes JSON has.
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_ESCAPE_PREFIX = re.compile(r'\\(?:u[0-9a-fA-F]{0,3})?')   # an escape cut where the text ends
_PRIMITIVE = re.compile(r"[-+0-9.eEa-zA-Z]+")
# what json.loads reads as a literal or number (NaN and the infinities included)
_LITERAL = re.compile(r"true|false|null|NaN|-?Infinity|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\n\r]*")


def skip_space(text: str, at: int) -> int:
    """Where JSON whitespace from ``text[at]`` ends."""
    return _SPACE.match(text, at).end()


class _Expect(enum.Enum):
    """What a container accepts next."""

    KEY_OR_END = "key or }"      # just after "{"
    KEY = "key"                  # after a "," in an object
    COLON = ":"
    VALUE = "value"              # after ":" or a "," in an array
    VALUE_OR_END = "value or ]"  # just after "["
    COMMA_OR_END = ", or end"


class ArgsState(enum.Enum):
    """Whether a call's arguments are what a call takes (an object, ``null``, or a JSON string of one)."""

    PENDING = "pending"   # not decided yet (not begun, or a string or literal not finished)
    VALID = "valid"
    INVALID = "invalid"


@dataclasses.dataclass
class PartialCall:
    """One call object (``{"name": ..., "arguments": {...}}``) in ``text[start:]`` as far as written.

    - ``name``: the name once its string is complete (the first ``name`` key's); ``bad_name``: that
      value is not a string; ``args_start``/``args_end``: the arguments value's
      span (``args_end`` None while it is open); ``end``: just after the closing brace (None while
      open); ``broken``: not JSON, or not the shape of a call (it can only be text, or garbage).
    """

    start: int
    name: str | None = None
    bad_name: bool = False
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None
    broken: bool = False
    # the draft of a finished call (it no longer changes: a stream asks for it on every chunk)
    _finished: tuple = dataclasses.field(default=(), repr=False, compare=False)

    def arguments(self, text: str) -> str:
        """The arguments' JSON text written so far: an object's own text (growing while it is
        open), a JSON-string argument decoded once complete, ``{}`` for none or ``null``; else ''."""
        return self.args(text)[1]

    def args(self, text: str) -> tuple[ArgsState, str]:
        """The arguments' state and their text so far (:meth:`arguments`)."""
        if self.args_start is None:
            return (ArgsState.VALID, "{}") if self.end is not None else (ArgsState.PENDING, "")
        first = text[self.args_start]
        if first == "{":
            return ArgsState.VALID, text[self.args_start:self.args_end if self.args_end is not None else len(text)]
        if self.args_end is None:
            return (ArgsState.PENDING if first in '"n' else ArgsState.INVALID), ""
        raw = text[self.args_start:self.args_end]
        if raw == "null":
            return ArgsState.VALID, "{}"
        if first != '"':
            return ArgsState.INVALID, ""
        decoded = _decode(raw)
        if not isinstance(decoded, str):
            return ArgsState.INVALID, ""
        try:
            value = json.loads(decoded)
        except (json.JSONDecodeError, RecursionError):
            return ArgsState.INVALID, ""
        if value is None:
            return ArgsState.VALID, "{}"
        return (ArgsState.VALID, decoded) if isinstance(value, dict) else (ArgsState.INVALID, "")

    def draft(self, text: str) -> CallDraft | None:
        """The call as a stream may send it: its name only once the call is known to be one so far
        (its arguments begun as an object, or finished and valid); None: it is not a call."""
        if self._finished:
            return self._finished[0]
        draft = self._draft(text)
        if self.end is not None or self.broken:
            self._finished = (draft,)
        return draft

    def _draft(self, text: str) -> CallDraft | None:
        if self.broken or self.bad_name or self.name == "" or (self.name is None and self.end is not None):
            return None
        state, arguments = self.args(text)
        if state is ArgsState.INVALID:
            return None
        if state is ArgsState.PENDING or self.name is None:
            return CallDraft(None, "")
        return CallDraft(self.name, arguments)


def loads_first_wins(text: str):
    """``json.loads`` where an object's first value of a key wins (``json``'s own: the last), as the
    scanner reads call objects."""
    return json.loads(text, object_pairs_hook=_first_wins)


def _first_wins(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _decode(raw: str):
    """A JSON string's value (None where ``json`` refuses it: the scanner's grammar should not let
    that happen, and a stream must not fail on it)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None


class ObjectScanner:
    """Resumable scan of the call object whose ``{`` is at ``text[start]``: :meth:`advance` reads
    the text written since the last call (the text only grows) and returns the :class:`PartialCall`.

    - ``args_keys``: the keys whose value is the arguments (the first of them written wins);
      ``seen``: the call object's keys so far (a key's first value wins); ``pos``: where reading resumes; ``stack``: the open containers
      (``{`` or ``[``) and what each expects next; ``string_at``: the open string's start;
      ``key``/``value_at``: the call object's current key and the start of its value;
      ``scanned``: characters read in all (the work bound).
    """

    def __init__(self, start: int, args_keys: tuple[str, ...]) -> None:
        self.call = PartialCall(start)
        self.args_keys = args_keys
        self.seen: set[str] = set()
        self.pos = start + 1
        self.stack: list[list] = [["{", _Expect.KEY_OR_END]]
        self.string_at: int | None = None
        self.key: str | None = None
        self.value_at: int | None = None
        self.scanned = 0

    def advance(self, text: str) -> PartialCall:
        call = self.call
        if call.end is None and not call.broken:
            self.scanned += max(0, len(text) - self.pos)
            self._run(text)
        return call

    def _run(self, text: str) -> None:
        call, n = self.call, len(text)
        while call.end is None and not call.broken:
            if self.string_at is not None:
                if not self._string(text):
                    return
                continue
            at = skip_space(text, self.pos)
            if at >= n:
                self.pos = at
                return
            c, frame = text[at], self.stack[-1]
            expect = frame[1]
            if expect in (_Expect.KEY_OR_END, _Expect.KEY):
                if c == '"':
                    self.string_at, self.pos = at, at + 1
                elif c == "}" and expect is _Expect.KEY_OR_END:
                    self._close(at + 1)
                else:
                    call.broken = True
            elif expect is _Expect.COLON:
                if c != ":":
                    call.broken = True
                frame[1], self.pos = _Expect.VALUE, at + 1
            elif expect in (_Expect.VALUE, _Expect.VALUE_OR_END):
                if c == "]" and expect is _Expect.VALUE_OR_END:
                    self._close(at + 1)
                    continue
                if len(self.stack) == 1:
                    self._value_begins(at)
                if c in "{[":
                    frame[1] = _Expect.COMMA_OR_END
                    self.stack.append([c, _Expect.KEY_OR_END if c == "{" else _Expect.VALUE_OR_END])
                    self.pos = at + 1
                elif c == '"':
                    self.string_at, self.pos = at, at + 1
                else:
                    m = _PRIMITIVE.match(text, at)
                    if m is None:
                        call.broken = True
                    elif m.end() >= n:
                        self.pos = at   # a number may still grow: read it again next time
                        return
                    elif not _LITERAL.fullmatch(m.group()):
                        call.broken = True
                    else:
                        self._scalar_done(text, at, m.end())
            elif c == ",":
                frame[1], self.pos = (_Expect.KEY if frame[0] == "{" else _Expect.VALUE), at + 1
            elif c == ("}" if frame[0] == "{" else "]"):
                self._close(at + 1)
            else:
                call.broken = True

    def _string(self, text: str) -> bool:
        """Reads on in the open string; False: the text ends first (or the string is not JSON)."""
        at = _STRING_BODY.match(text, self.pos).end()
        self.pos = at
        if at >= len(text):
            return False
        if text[at] == '"':
            start, self.string_at = self.string_at, None
            self._scalar_done(text, start, at + 1)
            return True
        if text[at] == "\\" and _ESCAPE_PREFIX.fullmatch(text, at):
            return False   # an escape cut short: read it again next time
        self.call.broken = True
        return False

    def _scalar_done(self, text: str, start: int, end: int) -> None:
        """A string or literal ``text[start:end]`` is complete: a key, or a value."""
        self.pos = end
        frame = self.stack[-1]
        if frame[1] in (_Expect.KEY_OR_END, _Expect.KEY):
            frame[1] = _Expect.COLON
            if len(self.stack) == 1:
                key = _decode(text[start:end])
                self.call.broken = key is None
                self.key = None if key in self.seen else key   # a repeated key's value does not count
                self.seen.add(key)
            return
        frame[1] = _Expect.COMMA_OR_END
        if len(self.stack) == 1:
            self._value_ends(text, end)

    def _close(self, end: int) -> None:
        self.pos = end
        self.stack.pop()
        if not self.stack:
            self.call.end = end
        elif len(self.stack) == 1:
            self._value_ends(None, end)

    def _value_begins(self, at: int) -> None:
        self.value_at = at
        if self.key in self.args_keys and not self.seen.intersection(self.args_keys).difference([self.key]):
            self.call.args_start = at

    def _value_ends(self, text: str | None, end: int) -> None:
        call = self.call
        if call.args_start == self.value_at:
            call.args_end = end
        if self.key == "name":
            name = _decode(text[self.value_at:end]) if text is not None and text[self.value_at] == '"' else None
            call.name, call.bad_name = name, not isinstance(name, str)


def scan_object(text: str, start: int, args_keys: tuple[str, ...]) -> PartialCall:
    """The call object whose ``{`` is at ``text[start]``, scanned at once."""
    return ObjectScanner(start, args_keys).advance(text)


def drafts_of(text: str, calls: list[PartialCall], skip_invalid: bool = False) -> list[CallDraft]:
    """The drafts of ``calls`` up to the first that is not a call (``skip_invalid``: a well-formed
    object that is not a valid call is left out instead, as ``required``'s extraction filters it)."""
    out = []
    for call in calls:
        draft = call.draft(text)
        if draft is None:
            if skip_invalid and not call.broken:
                continue
            break
        out.append(draft)
    return out
