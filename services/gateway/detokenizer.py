"""Incremental detokenization with stop-string handling, O(1) work per new token.

Byte-level BPE tokens can split a UTF-8 character, and a token's text can depend on its left
neighbour, so each step decodes only the tokens since the last emitted text (vLLM's prefix/read offsets) and holds back text
that may still change: an incomplete character, or a tail that could be the start of a stop string.
"""

from __future__ import annotations

from neo_gateway.tokenizer import TextTokenizer

class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas.

    - ``text``: all text decoded so far (cut at a stop string once one matched).
    - ``emitted``: how much of ``text`` has been handed out as deltas.
    - ``prefix_offset``/``read_offset``: token window for the next decode step.
    - ``stopped``: a stop string matched; no more text follows.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; returns the text now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            search_from = max(0, len(self.text) - self.max_stop + 1)
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.stop:
                self._check_stop(search_from)
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """Everything still held back (the request finished)."""
        return self._release(final=True)

    def _check_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._stop_prefix_len()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
