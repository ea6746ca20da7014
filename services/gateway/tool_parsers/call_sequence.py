"""Call objects one after another (Llama 3's ``;``-separated calls, ``required``'s array), scanned
as they are written: each object by :class:`~neo_gateway.tool_parsers.partial_json.ObjectScanner`."""

from __future__ import annotations

from neo_gateway.tool_parsers.base import CallDraft, CallScanner
from neo_gateway.tool_parsers.partial_json import ObjectScanner, PartialCall, drafts_of


class SequenceScanner:
    """Resumable scan of call objects one after another from ``text[at]`` (a ``{``), separated by
    whitespace and ``separators`` (``;`` for Llama 3's, ``,`` in an array).

    - ``done``: the calls finished; ``current``: the open call's scanner; ``pos``: where the next
      call may start (while none is open); ``scanned``: characters read in all.
    """

    def __init__(self, at: int, args_keys: tuple[str, ...], separators: str) -> None:
        self.args_keys, self.separators = args_keys, separators
        self.done: list[PartialCall] = []
        self.current: ObjectScanner | None = None
        self.pos = at
        self.stopped = False
        self.scanned = 0

    def advance(self, text: str) -> list[PartialCall]:
        while not self.stopped:
            if self.current is None:
                while self.pos < len(text) and (text[self.pos].isspace() or text[self.pos] in self.separators):
                    self.pos += 1
                if self.pos >= len(text):
                    break
                if text[self.pos] != "{":
                    self.stopped = True
                    break
                self.current = ObjectScanner(self.pos, self.args_keys)
            before = self.current.scanned
            call = self.current.advance(text)
            self.scanned += self.current.scanned - before
            if call.broken:
                self.stopped = True
            if call.end is None or call.broken:
                break
            self.done.append(call)
            self.current, self.pos = None, call.end
        return self.done + ([self.current.call] if self.current is not None else [])


class SequenceCallScanner(CallScanner):
    """A :class:`CallScanner` of call objects one after another (:class:`SequenceScanner`) from
    where :meth:`start` finds the first; ``skip_invalid``: as in :func:`drafts_of`."""

    args_keys: tuple[str, ...] = ()
    separators = ""
    skip_invalid = False

    def __init__(self) -> None:
        self.sequence: SequenceScanner | None = None

    def start(self, text: str) -> int | None:
        """Where the first call object may start; None while that is not known yet."""
        raise NotImplementedError

    @property
    def scanned(self) -> int:
        return self.sequence.scanned if self.sequence is not None else 0

    def calls(self, text: str) -> list[PartialCall]:
        if self.sequence is None:
            at = self.start(text)
            if at is None or at >= len(text):
                return []
            self.sequence = SequenceScanner(at, self.args_keys, self.separators)
        return self.sequence.advance(text)

    def drafts(self, text: str) -> list[CallDraft]:
        return drafts_of(text, self.calls(text), self.skip_invalid)
