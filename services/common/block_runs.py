"""Block copies as runs: what both pools' swaps and the CPU-bound prefill stream-out copy."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def merge_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> np.ndarray:
    """Block copies as ``[n, 3]`` int32 runs (src, dst, count), merging runs contiguous in both pools.

    This is IterationPlan.swap_out / swap_in: a whole request moved between pools becomes a few
    large copies instead of one per block. Order is kept; pairs of several requests may be
    concatenated (a run may then span two requests, which is still one valid copy).
    """
    src = np.asarray(src_blocks, dtype=np.int64)
    dst = np.asarray(dst_blocks, dtype=np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError("src_blocks and dst_blocks must be 1-D and of equal length")
    if len(src) == 0:
        return np.zeros((0, 3), np.int32)
    # A new run starts wherever either side is not the previous block + 1.
    starts = np.flatnonzero(np.r_[True, (np.diff(src) != 1) | (np.diff(dst) != 1)])
    counts = np.diff(np.r_[starts, len(src)])
    return np.stack([src[starts], dst[starts], counts], axis=1).astype(np.int32)
