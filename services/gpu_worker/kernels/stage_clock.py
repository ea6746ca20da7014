"""Device-side stage timing for GPU emulation (``neo_gpu_worker.emulation.StageClock``).

``stamp_now(buf)`` writes the GPU's global nanosecond timer into ``buf[0]`` when the stream reaches
it; ``spin_until(buf, ns)`` keeps one program busy until the timer reads ``buf[0] + ns``. Both are
ordered on the current stream like any kernel, so a stage bracketed by them lasts at least ``ns``
and the host never waits. One program of one warp: the spin occupies one SM's slot, not the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _stamp_kernel(buf_ptr):
    tl.store(buf_ptr, _now(tl.full((), 0, tl.int32)))


@triton.jit
def _spin_kernel(buf_ptr, ns):
    until = tl.load(buf_ptr) + ns
    t = _now(tl.full((), 0, tl.int32))
    while t < until:
        t = _now(tl.full((), 0, tl.int32))


def stamp_now(buf: torch.Tensor) -> None:
    _stamp_kernel[(1,)](buf, num_warps=1)


def spin_until(buf: torch.Tensor, ns: int) -> None:
    _spin_kernel[(1,)](buf, ns, num_warps=1)
