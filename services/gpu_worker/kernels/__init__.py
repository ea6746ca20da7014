"""Triton kernels of the GPU worker's hot path, each beside the torch twin it must agree with.

The twins (``neo_gpu_worker.ops``) are the portable path: the CPU device runs them, and tests
compare every kernel against its twin (on the GPU in the benchmark run, and in CI through Triton's
interpreter, ``TRITON_INTERPRET=1``, which executes the same kernel source on the CPU).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Triton runs kernels on the CPU (numpy) instead of compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"
