"""Strided copies between device memory and the pinned host segment, one DMA per (run, side).

A run of blocks in the host pool ``[layers, blocks, kv_heads, block_size, head_dim]`` is, across all
layers, a 2-D region: ``layers`` rows of ``count x block`` bytes, one host pool layer apart. torch's
``copy_`` cannot copy such a region without a pageable temporary (its cross-device copies need
contiguous operands), so a swap written with it costs one copy per layer, side and run (64 calls
per run for Llama-3-8B), each with its Python and launch overhead. ``cudaMemcpy2DAsync`` moves the
region in one call on the current stream, ordered with the kernels around it and without the host
waiting (docs/design.md, "Prefix caching"). The CUDA runtime torch loaded is called through ctypes:
torch's own binding exposes no 2-D copy.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

MAX_PITCH = 2**31 - 1          # cudaDevAttrMaxPitch on every CUDA GPU to date
_CUDA_MEMCPY_DEFAULT = 4       # cudaMemcpyDefault: direction from the (unified) addresses


def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library this process already mapped (torch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ")[-1]
                if os.path.basename(path).startswith("libcudart.so"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None


class Dma2d:
    """``cudaMemcpy2DAsync`` of the runtime torch uses, on torch's current stream."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.cudaMemcpy2DAsync
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn
        self._clear_error = lib.cudaGetLastError
        self._clear_error.restype = ctypes.c_int

    @classmethod
    def load(cls) -> "Dma2d | None":
        """The 2-D copy, if CUDA is initialised and its runtime library can be found (else None:
        callers copy layer by layer)."""
        if not torch.cuda.is_available():
            return None
        torch.cuda.init()
        lib = _loaded_cudart()
        if lib is None:
            log.warning("libcudart is not mapped in this process: KV swaps copy layer by layer")
            return None
        return cls(lib)

    def copy(self, dst: torch.Tensor, dst_pitch: int, src: torch.Tensor, src_pitch: int,
             width: int, height: int) -> None:
        """``height`` rows of ``width`` bytes from ``src``'s first byte (rows ``src_pitch`` bytes
        apart) to ``dst``'s (``dst_pitch`` apart), queued on the current stream. Pitches over
        :data:`MAX_PITCH` are the caller's to avoid."""
        stream = torch.cuda.current_stream().cuda_stream
        err = self._fn(dst.data_ptr(), dst_pitch, src.data_ptr(), src_pitch, width, height,
                       _CUDA_MEMCPY_DEFAULT, stream)
        if err:
            self._clear_error()   # else torch's next launch check reports it against another kernel
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err} "
                               f"(width {width}, height {height}, pitches {dst_pitch}/{src_pitch})")
