"""The assistant message (or its stream of deltas) that one chat request's text becomes."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from neo_gateway.param_error import ParamError
from neo_gateway.tool_parsers.base import CallDraft, CallScanner, ExtractedToolCalls, ToolCall, ToolParser
from neo_gateway.tool_parsers.call_sequence import SequenceCallScanner
from neo_gateway.tool_parsers.partial_json import loads_first_wins, skip_space
from neo_gateway.tool_parsers.registry import parser_for
from neo_gateway.tool_parsers.choice import ToolChoiceMode, ToolRequest

TOOL_CALLS = "tool_calls"   # the finish reason of a choice that ends in tool calls


class ToolOutput:
    """Turns generated text into ``content`` and ``tool_calls`` for one chat request.

    - ``request``: the tools and the choice mode; ``parser``: the server's tool-call parser (auto).
    - ``_text``/``_sent``: per choice index (streaming), the text so far and how much of it went
      out as content; text that may still be a tool call is held back until the choice ends.
    - ``_calls``: per choice index, the calls streamed so far (:class:`_SentCall`): each is sent
      as vLLM streams them, its ``id``, ``type`` and ``function.name`` first, then its
      ``function.arguments`` in pieces as the model writes them.
    - ``_scanners``: per choice index, the scanner of its calls (it reads each chunk's text once).
    """

    def __init__(self, request: ToolRequest, parser: ToolParser | None) -> None:
        self.request, self.parser = request, parser
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}
        self._calls: dict[int, list[_SentCall]] = {}
        self._scanners: dict[int, CallScanner] = {}

    @classmethod
    def for_request(cls, request: ToolRequest, parser_name: str) -> "ToolOutput":
        """``parser_name``: the server's ``--tool-call-parser`` (``none``: tool_choice auto is refused,
        as vLLM refuses it without ``--enable-auto-tool-choice``)."""
        if request.mode is ToolChoiceMode.AUTO and parser_name == "none":
            raise ParamError("tool_choice", 'tool_choice "auto" needs a tool-call parser (this server runs with '
                                            '--tool-call-parser none); use "required" or a named function')
        return cls(request, parser_for(parser_name) if parser_name != "none" else None)

    @property
    def active(self) -> bool:
        return self.request.mode is not ToolChoiceMode.NONE

    def extract(self, text: str) -> ExtractedToolCalls:
        mode = self.request.mode
        if mode is ToolChoiceMode.NAMED:
            return ExtractedToolCalls(None, [ToolCall(self.request.named, text)])
        if mode is ToolChoiceMode.REQUIRED:
            try:
                parsed = loads_first_wins(text)
                raw = [c.arguments(text) for c in _RequiredScanner().calls(text)]
                raw = raw if len(raw) == len(parsed) else [None] * len(parsed)
                calls = [ToolCall.of(c.get("name"), c.get("parameters"), r) for c, r in zip(parsed, raw)]
            except (json.JSONDecodeError, RecursionError, AttributeError, TypeError):
                return ExtractedToolCalls(text, [])   # cut short by max_tokens: what was written stays text
            return ExtractedToolCalls(None, [c for c in calls if c is not None])
        if mode is ToolChoiceMode.AUTO and self.parser is not None:
            found = self.parser.extract(text)
            if not self.request.parallel:
                found.calls = found.calls[:1]
            return found
        return ExtractedToolCalls(text, [])

    def finish_reason(self, found: ExtractedToolCalls, reason: str | None) -> str | None:
        return TOOL_CALLS if found.calls and reason == "stop" else reason

    # -- whole responses ----------------------------------------------------------------------------
    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The choice's assistant message and its finish reason (``tool_calls`` when it made calls)."""
        if not self.active:
            return {"role": "assistant", "content": text}, reason
        found = self.extract(text)
        message = {"role": "assistant", "content": found.content}
        if found.calls:
            message["tool_calls"] = [c.to_dict() for c in found.calls]
        return message, self.finish_reason(found, reason)

    def shape(self, final: dict) -> tuple[dict[int, dict], dict]:
        """The messages of a whole response's choices (index -> RequestOutput), and the choices with
        their finish reasons (``tool_calls`` where calls were made)."""
        shaped = {i: self.message(out.text, out.finish_reason) for i, out in final.items()}
        return ({i: m for i, (m, _) in shaped.items()},
                {i: dataclasses.replace(out, finish_reason=shaped[i][1]) for i, out in final.items()})

    # -- streams ----------------------------------------------------------------------------------
    def wrap_chunk(self, chunk: Callable) -> Callable:
        """``chunk(index, out)`` with tool-aware deltas: content streams while it surely is content;
        calls stream as they are written (:meth:`_call_deltas`); at the choice's end, the rest of
        the content and of the calls, as :meth:`extract` finds them in the whole text."""
        if not self.active:
            return chunk

        def wrapped(index, out):
            if out is None:
                return chunk(index, out)
            made = chunk(index, out)
            if made is None:
                return None   # no new text: nothing new to say either (and a call's first delta must go out)
            delta, reason = self._step(index, out.text, out.finished, out.finish_reason)
            for choice in made["choices"]:
                choice["delta"], choice["finish_reason"] = delta, reason
            return made
        return wrapped

    def scanner(self) -> CallScanner | None:
        """A scanner of one output's calls as far as written, by the mode (None: named, whose
        arguments are the whole text): ``required`` writes an array of calls; ``auto``: the parser's."""
        mode = self.request.mode
        if mode is ToolChoiceMode.REQUIRED:
            return _RequiredScanner()
        if mode is ToolChoiceMode.AUTO and self.parser is not None:
            return self.parser.scanner()
        return _NoCalls() if mode is not ToolChoiceMode.NAMED else None

    def _drafts(self, index: int, text: str) -> list[CallDraft]:
        if self.request.mode is ToolChoiceMode.NAMED:
            return [CallDraft(self.request.named, text)]
        scanner = self._scanners.get(index)
        if scanner is None:
            scanner = self._scanners[index] = self.scanner()
        drafts = scanner.drafts(text)
        return drafts if self.request.parallel else drafts[:1]

    def _step(self, index: int, text: str, finished: bool, reason: str | None) -> tuple[dict, str | None]:
        whole = self._text.get(index, "") + text
        self._text[index] = whole
        sent = self._sent.get(index, 0)
        if not finished:
            end = self.parser.content_end(whole, sent) \
                if self.request.mode is ToolChoiceMode.AUTO and self.parser else 0
            self._sent[index] = max(sent, end)
            delta = {"content": whole[sent:end]} if end > sent else {}
            calls = self._call_deltas(index, self._drafts(index, whole))
            if calls:
                delta["tool_calls"] = calls
            return delta, None
        found = self.extract(whole)
        final = [CallDraft(c.name, c.arguments) for c in found.calls]
        delta: dict = {}
        if not self._continues(index, final):
            # A call already streamed turned out not to be one (cut short, a trailing comma, text
            # after it...): it cannot be taken back (vLLM's streaming parsers cannot either), so the
            # stream ends it as scanned, and the text it was written in is not sent as content too.
            calls = self._call_deltas(index, self._drafts(index, whole))
            reason = TOOL_CALLS if reason == "stop" else reason
        else:
            content = found.content or ""
            if content.startswith(whole[:sent]) and len(content) > sent:
                delta["content"] = content[sent:]
            calls = self._call_deltas(index, final, found.calls)
            reason = self.finish_reason(found, reason)
        if calls:
            delta["tool_calls"] = calls
        return delta, reason

    def _continues(self, index: int, final: list[CallDraft]) -> bool:
        """Whether the calls a stream sent are the start of ``final``'s (same names, arguments prefixes)."""
        sent = self._calls.get(index, [])
        return len(sent) <= len(final) and all(
            s.name == f.name and f.arguments.startswith(s.arguments) for s, f in zip(sent, final))

    def _call_deltas(self, index: int, drafts: list[CallDraft], final: list[ToolCall] | None = None) -> list[dict]:
        """What the client has not seen of ``drafts``: a call's first delta once its name is known
        (``id``, ``type``, ``function.name``, the arguments so far), then the arguments' growth.
        ``final``: the calls of the whole output (a call first seen there goes out with its id)."""
        sent = self._calls.setdefault(index, [])
        out = []
        for k, draft in enumerate(drafts):
            if draft.name is None:
                break   # calls go out in order: a later one waits for this one's name
            if k == len(sent):
                call_id = final[k].id if final else ToolCall(draft.name, "").id
                sent.append(_SentCall(call_id, draft.name, draft.arguments))
                out.append({"index": k, "id": call_id, "type": "function",
                            "function": {"name": draft.name, "arguments": draft.arguments}})
                continue
            done = sent[k]
            if len(draft.arguments) > len(done.arguments) and draft.name == done.name \
                    and draft.arguments.startswith(done.arguments):
                out.append({"index": k, "function": {"arguments": draft.arguments[len(done.arguments):]}})
                done.arguments = draft.arguments
        return out


@dataclasses.dataclass
class _SentCall:
    """A call as a stream has sent it so far."""

    id: str
    name: str
    arguments: str


def _array_start(text: str) -> int | None:
    """Where ``required``'s first call object may start (after ``[``); None: not an array (yet)."""
    at = skip_space(text, 0)
    if not text.startswith("[", at):
        return None
    return skip_space(text, at + 1)


class _RequiredScanner(SequenceCallScanner):
    """The calls of ``required``'s array (``[{"name": ..., "parameters": {...}}, ...]``) as far as
    written; a call :meth:`ToolOutput.extract` would leave out (its parameters not an object) is
    left out here too, so that the calls' indices are the same."""

    args_keys, separators, skip_invalid = ("parameters",), ",", True

    def start(self, text: str) -> int | None:
        return _array_start(text)


class _NoCalls(CallScanner):
    scanned = 0

    def drafts(self, text: str) -> list[CallDraft]:
        return []

