"""Token bitmasks: bit ``t % 32`` of word ``t // 32`` of a row set means token ``t`` is allowed
(llguidance's and xgrammar's layout, what the worker's sampler unpacks)."""

from __future__ import annotations

import threading

import llguidance
import llguidance.numpy
import numpy as np

from neo_gateway.structured_output.request import StructuredOutputRequest

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_PARALLEL_FROM = 4   # rows from which the mask fill is spread over llguidance's threads


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def fill_bitmasks(requests: list[StructuredOutputRequest]) -> np.ndarray:
    """The next step's masks of ``requests`` as one ``[len(requests), words]`` int32 array. Few
    rows: one after another (each drops the GIL); more: in parallel on llguidance's threads."""
    width = bitmask_width(requests[0].vocab_size)
    out = np.full((len(requests), width), -1, np.int32)
    if len(requests) >= _PARALLEL_FROM:
        llguidance.numpy.fill_next_token_bitmask_par(
            _shared_executor(), [(r.matcher, i) for i, r in enumerate(requests)], out)
    else:
        for i, r in enumerate(requests):
            llguidance.numpy.fill_next_token_bitmask(r.matcher, out, i)
    return out


def distinct_rows(bitmask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows of ``bitmask``, each row's index among them). Requests in one grammar
    state (a batch writing JSON strings, say) share a mask: a 64-row batch of Llama-3's vocabulary
    is 1 MB of masks to encode, send and copy to the device per iteration, a few distinct rows of it
    a few tens of KB."""
    seen: dict[bytes, int] = {}
    first: list[int] = []
    index = np.empty(len(bitmask), np.int32)
    # rows in a batch's order repeat their neighbour most often: one vectorized pass finds those
    repeats = np.zeros(len(bitmask), bool)
    repeats[1:] = (bitmask[1:] == bitmask[:-1]).all(axis=1)
    for i in range(len(bitmask)):
        if repeats[i]:
            index[i] = index[i - 1]
            continue
        j = seen.setdefault(bitmask[i].tobytes(), len(first))
        if j == len(first):
            first.append(i)
        index[i] = j
    return bitmask[first], index


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[rows, words]`` int32 -> ``[rows, vocab_size]`` bool (allowed), on the host (tests, checks)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)
