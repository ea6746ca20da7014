"""Logprobs in the gateway: the worker's columns read into per-token entries, and those entries
shaped as the OpenAI / vLLM responses carry them.

- completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``; each
  ``top_logprobs`` dict holds the top ``logprobs`` tokens and the chosen one (up to k + 1, as
  OpenAI and vLLM), likeliest first; with ``echo`` the prompt's tokens come first, the first with
  None (nothing predicts it).
- chat: ``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`` with the
  top ``top_logprobs`` tokens.
- vLLM's ``prompt_logprobs``: ``[None, {"<id>": {logprob, rank, decoded_token}}, ...]``.

Token strings are the single token decoded (vLLM's choice: a token that splits a UTF-8 character
shows U+FFFD), or ``token_id:<id>`` with ``return_tokens_as_token_ids``. Logprobs are clamped at
-9999 (JSON has no -inf).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from neo_common.protocol import IterationResult
from neo_gateway.tokenizer import TextTokenizer

_FLOOR = -9999.0


@dataclasses.dataclass(slots=True)
class TokenLogprob:
    """One position: the ``token`` there, its ``logprob`` and ``rank`` (1 = likeliest), and the
    likeliest tokens as (id, logprob), descending."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def _entries(tokens: list[int], logprob: np.ndarray, rank: np.ndarray, top_ids: np.ndarray,
             top_values: np.ndarray, k: int) -> list[TokenLogprob]:
    lps, ranks = logprob.tolist(), rank.tolist()
    ids, values = top_ids[:, :k].tolist(), top_values[:, :k].tolist()
    return [TokenLogprob(t, lp, r, list(zip(i, v))) for t, lp, r, i, v in zip(tokens, lps, ranks, ids, values)]


def sampled_logprobs(result: IterationResult, sampled: dict[int, int], asked: dict[int, int]) -> dict[int, TokenLogprob]:
    """seq id -> its sampled token's entry, top cut to what it ``asked`` (seq id -> k)."""
    out = {}
    for j, seq_id in enumerate(result.lp_seq_ids.tolist()):
        k = asked.get(seq_id)
        if k is not None and seq_id in sampled:
            out[seq_id] = _entries([sampled[seq_id]], result.lp_logprob[j:j + 1], result.lp_rank[j:j + 1],
                                   result.lp_top_ids[j:j + 1], result.lp_top_values[j:j + 1], k)[0]
    return out


def prompt_logprobs(result: IterationResult):
    """(seq id, start, count) of each row's prompt logprobs in the result (:func:`prompt_entries`
    builds them)."""
    ends = np.cumsum(result.plp_count.astype(np.int64))
    for seq_id, count, end in zip(result.plp_seq_ids.tolist(), result.plp_count.tolist(), ends.tolist()):
        yield seq_id, end - count, count


def prompt_entries(result: IterationResult, start: int, tokens: list[int], k: int) -> list[TokenLogprob]:
    s = slice(start, start + len(tokens))
    return _entries(tokens, result.plp_logprob[s], result.plp_rank[s], result.plp_top_ids[s],
                    result.plp_top_values[s], k)


class LogprobFormatter:
    """Shapes entries for one request: ``as_ids`` (``return_tokens_as_token_ids``) and a cache of
    token strings (a response names the same tokens over and over)."""

    def __init__(self, tokenizer: TextTokenizer, as_ids: bool = False) -> None:
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        s = self._text.get(token)
        if s is None:
            s = self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return s

    # -- completions --
    def completion(self, entries: list[TokenLogprob | None], tokens: list[int], k: int, offset: int = 0) -> dict:
        """``entries[i]`` None: a position nothing predicts (the first prompt token)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e, token in zip(entries, tokens):
            text = self.text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_clamp(e.logprob))
            top = {self.text(t): _clamp(v) for t, v in e.top[:k]}
            top.setdefault(text, _clamp(e.logprob))   # the chosen token too (OpenAI: up to k + 1)
            out["top_logprobs"].append(top)
        return out

    # -- chat --
    def chat(self, entries: list[TokenLogprob], k: int) -> dict:
        return {"content": [self._chat_one(e.token, e.logprob) | {
            "top_logprobs": [self._chat_one(t, v) for t, v in e.top[:k]]} for e in entries]}

    def _chat_one(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    # -- vLLM's prompt_logprobs --
    def prompt(self, entries: list[TokenLogprob], k: int) -> list:
        out: list = [None]
        for e in entries:
            d = {str(t): {"logprob": _clamp(v), "rank": r + 1, "decoded_token": self.text(t)}
                 for r, (t, v) in enumerate(e.top[:k])}
            d.setdefault(str(e.token), {"logprob": _clamp(e.logprob), "rank": e.rank, "decoded_token": self.text(e.token)})
            out.append(d)
        return out


class PendingLogprobs:
    """Per choice of a response: the logprob entries of outputs whose text has not gone out yet
    (held back by the detokenizer), and the prompt logprobs that came with its first output."""

    def __init__(self) -> None:
        self.entries: dict[int, list[TokenLogprob]] = {}
        self.prompt: dict[int, list[TokenLogprob]] = {}

    def add(self, index: int, out) -> None:
        if out.logprobs:
            self.entries.setdefault(index, []).extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt[index] = out.prompt_logprobs

    def take(self, index: int) -> list[TokenLogprob] | None:
        return self.entries.pop(index, None)


def _clamp(value: float) -> float:
    return _FLOOR if math.isnan(value) or value < _FLOOR else value


def to_wire(entry: TokenLogprob) -> list:
    """An entry as the engine core sends it (``EngineCoreOutputs.details``)."""
    return [entry.token, entry.logprob, entry.rank, [[t, v] for t, v in entry.top]]


def from_wire(value: list) -> TokenLogprob:
    token, logprob, rank, top = value
    return TokenLogprob(int(token), float(logprob), int(rank), [(int(t), float(v)) for t, v in top])
