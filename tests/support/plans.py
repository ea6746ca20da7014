"""Iteration plans written by hand, for tests that drive a GPU worker over its socket as the
gateway would: one row per request (ids 0, 1, ...), request r in KV blocks 4r..4r+3, greedy."""

from __future__ import annotations

import numpy as np

from neo_common.protocol import IterationPlan

# two prompts of the embedded model's vocabulary
PROMPTS = [[1, 504, 3458, 314, 260, 3153, 282, 4780], [1, 11148, 284, 1345, 314]]


def plan(iteration: int, tokens: list[list[int]], start: list[int]) -> IterationPlan:
    """One row per request (ids 0, 1), request r in blocks 4r..4r+3, every row sampled greedily."""
    n = len(tokens)
    return IterationPlan(
        iteration_id=iteration, seq_ids=np.arange(n, dtype=np.int64), places=np.zeros(n, np.uint8),
        sub_batch=np.zeros(n, np.uint8), start_pos=np.array(start, np.int32),
        num_tokens=np.array([len(t) for t in tokens], np.int32),
        token_ids=np.array([t for row in tokens for t in row], np.int32),
        block_tables=np.arange(4 * n, dtype=np.int32).reshape(n, 4), sample=np.ones(n, np.uint8),
        temperature=np.zeros(n, np.float32), top_p=np.ones(n, np.float32), top_k=np.full(n, -1, np.int32),
        seeds=np.full(n, -1, np.int64), steps=np.zeros(n, np.int32))


def only(tokens: list[int], vocab: int) -> np.ndarray:
    """Grammar masks, one row per token, each allowing that token alone."""
    words = np.zeros((len(tokens), (vocab + 31) // 32), np.uint32)
    for i, t in enumerate(tokens):
        words[i, t // 32] = np.uint32(1) << np.uint32(t % 32)
    return words.view(np.int32)


def deferred(p: IterationPlan) -> IterationPlan:
    p.bitmask_rows, p.bitmask_deferred = np.arange(p.batch_size, dtype=np.int32), True
    return p
