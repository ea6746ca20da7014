"""Incremental detokenization with stop-string handling, O(1) work per new token.

Byte-level BPE tokens can split a UTF-8 character, and a token's text can depend on its left
neighbour, so each step decodes only the tokens since the last emitted text (vLLM's prefix/read offsets) and holds back text
that may still change: an incomplete character, or a tail that could be the start of a stop string.

The decoding itself is ``tokenizers``' ``DecodeStream`` (the same prefix/read-offset algorithm in
Rust: one call per token instead of two decodes and two list slices from Python; measured in
``benchmarks/gateway_hot_path.py``). It has no ``spaces_between_special_tokens``, so a request that
keeps special tokens and turns that option off decodes through :class:`WindowDecoder`, as before.
"""

from __future__ import annotations

import logging

from tokenizers.decoders import DecodeStream

from neo_gateway.sampling_params import SamplingParams
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class WindowDecoder:
    """vLLM's incremental decode over :meth:`TextTokenizer.decode`: the text of the tokens since
    ``prefix_offset`` minus the text of those before ``read_offset``, released once it does not end
    in an incomplete character. ``ids``: every token so far."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool, spaces_between_special_tokens: bool,
                 ids: list[int] | None = None, prefix_offset: int = 0, read_offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.decode_args = {"skip_special_tokens": skip_special_tokens,
                            "spaces_between_special_tokens": spaces_between_special_tokens}
        self.ids = ids if ids is not None else []
        self.prefix_offset, self.read_offset = prefix_offset, read_offset

    def step(self, token: int) -> str | None:
        """The new text ``token`` completes (None: nothing yet)."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], **self.decode_args)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], **self.decode_args)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return None


class StreamDecoder:
    """The same steps through ``tokenizers.decoders.DecodeStream``. It keeps the token ids and the
    two offsets too (an append and two ints a token) so that, should the stream refuse a step (its
    ``InvalidPrefix``: a decoder whose text of a window is not a prefix of the longer window's),
    the request carries on through :class:`WindowDecoder` from the same window instead of failing."""

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._tok = tokenizer.tok
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self._fallback: WindowDecoder | None = None

    def step(self, token: int) -> str | None:
        if self._fallback is not None:
            return self._fallback.step(token)
        try:
            text = self._stream.step(self._tok, token)
        except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception)
            log.warning("DecodeStream refused a token (%s); this request decodes through windows from here", exc)
            self._fallback = WindowDecoder(self.tokenizer, self.skip, True, self.ids, self.prefix_offset,
                                           self.read_offset)
            return self._fallback.step(token)
        self.ids.append(token)
        if text is not None:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text


def token_decoder(tokenizer: TextTokenizer, skip_special_tokens: bool,
                  spaces_between_special_tokens: bool) -> StreamDecoder | WindowDecoder:
    """DecodeStream where it decodes the same text; the window decoder where it cannot express the
    options (special tokens kept and no spaces between them: only TextTokenizer.decode knows that)."""
    if skip_special_tokens or spaces_between_special_tokens:
        return StreamDecoder(tokenizer, skip_special_tokens)
    return WindowDecoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas.

    - ``decoder``: the token-to-text step (:func:`token_decoder`).
    - ``text``: all text decoded so far (cut at a stop string once one matched).
    - ``emitted``: how much of ``text`` has been handed out as deltas.
    - ``num_tokens``: tokens added (a stop token left out of the text is not counted).
    - ``stopped``: a stop string matched; no more text follows.
    - ``min_tokens``: stop strings are looked for only after this many tokens (vLLM's rule).
    - ``include_stop``: a matched stop string, and a stop token's text, stay in the output (and no
      tail is held back waiting for a possible match).
    """

    def __init__(self, tokenizer: TextTokenizer, stop: list[str], min_tokens: int = 0,
                 include_stop: bool = False, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.decoder = token_decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.num_tokens = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False

    @classmethod
    def for_params(cls, tokenizer: TextTokenizer, params: SamplingParams) -> "IncrementalDetokenizer":
        return cls(tokenizer, params.stop, params.min_tokens, params.include_stop_str_in_output,
                   params.skip_special_tokens, params.spaces_between_special_tokens)

    def add(self, token: int, stop_token: bool = False) -> str:
        """Add one token; returns the text now safe to show (may be empty). ``stop_token``: the token
        that ends the request as a stop token (EOS or ``stop_token_ids``), whose text vLLM leaves
        out unless ``include_stop_str_in_output``."""
        if self.stopped or (stop_token and not self.include_stop):
            return ""
        self.num_tokens += 1
        new = self.decoder.step(token)
        if new:
            search_from = max(0, len(self.text) - self.max_stop + 1)
            self.text += new
            if self.stop and self.num_tokens > self.min_tokens:
                self._check_stop(search_from)
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """Everything still held back (the request finished)."""
        return self._release(final=True)

    def _check_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            at = min(hits)
            # several stop strings may match at the same place: the longest one is kept in the text
            kept = max(len(s) for s in self.stop if self.text.startswith(s, at)) if self.include_stop else 0
            self.text = self.text[:at + kept]
            self.stopped = True

    def _release(self, final: bool) -> str:
        held = 0 if self.include_stop else self._stop_prefix_len()
        end = len(self.text) if final else len(self.text) - held
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
