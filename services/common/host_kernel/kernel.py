"""Python API of the native decode-attention kernel (numpy in, numpy out; no torch).

Arrays hold the raw 16-bit patterns of bf16 or fp16 values (numpy ``uint16``/``int16``, or
``float16`` for fp16). Layouts are those of ``csrc/neo_attn.h``:

- ``q`` ``[B, Hq, D]``, ``k_new``/``v_new`` ``[B, Hkv, D]``, ``out`` ``[B, Hq, D]``
- ``k_cache``/``v_cache`` ``[num_blocks, Hkv, block_size, D]`` (one layer of the pool)
- ``block_tables`` ``[B, max_blocks]`` int32, ``seq_lens`` ``[B]`` int32 (context including the new token)
"""

from __future__ import annotations

import logging
import math

import numpy as np

from neo_common.enums import KvDtypeCode, NativeStatus
from neo_common.host_kernel import _native
from neo_common.host_kernel.cpus import available_cpus

log = logging.getLogger(__name__)

DTYPES = {code.name: int(code) for code in KvDtypeCode}
_ERRORS = {
    NativeStatus.INVALID_ARGUMENT: "invalid arguments (shape, dtype, head ratio or head_dim)",
    NativeStatus.BLOCK_OUT_OF_RANGE: "a block id is outside the pool",
    NativeStatus.BAD_SEQUENCE_LENGTH: "a sequence length is < 1 or needs more blocks than its block table holds",
    NativeStatus.NO_DOORBELL: "timed out waiting for a doorbell",
    NativeStatus.ABORTED: "aborted by the peer",
    NativeStatus.OUT_OF_MEMORY: "out of memory",
}


class KernelError(RuntimeError):
    """The native kernel refused or failed a call; ``code`` is the negative neo_status."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(f"{what or 'cpu attention'}: {describe(code)}")
        self.code = code


def describe(code: int) -> str:
    """A native status code in words (what KernelError, the server and the GPU worker report)."""
    return f"{_ERRORS.get(code, 'error')} (code {code})"


def dtype_code(dtype: str) -> int:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"KV dtype must be one of {sorted(DTYPES)}, not {dtype!r}") from None


def set_num_threads(n: int = 0) -> int:
    """Size the process-wide pool (0: the CPUs this process may use); returns the size."""
    n = n or available_cpus()
    _native.set_num_threads(int(n))
    return _native.get_num_threads()


def get_num_threads() -> int:
    return _native.get_num_threads()


def isa() -> str:
    """Instruction set the kernel dispatched to on this CPU."""
    return _native.isa_name()


def _addr(a: np.ndarray | None) -> int:
    return 0 if a is None else a.__array_interface__["data"][0]


def _check(name: str, a: np.ndarray, shape: tuple[int, ...], itemsize: int) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape}")
    if a.dtype.itemsize != itemsize:
        raise ValueError(f"{name} has dtype {a.dtype}, expected {itemsize}-byte elements")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def attend(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    *,
    k_new: np.ndarray | None = None,
    v_new: np.ndarray | None = None,
    out: np.ndarray | None = None,
    dtype: str = "bfloat16",
    scale: float | None = None,
) -> np.ndarray:
    """Decode attention of one new query token per request over its paged KV (one layer).

    When ``k_new``/``v_new`` are given they are first written into the cache at position
    ``seq_lens[b] - 1`` (so that token attends to itself). Returns ``out`` (allocated when None)
    with the raw 16-bit results. Raises :class:`KernelError` on bad block ids or lengths.
    """
    if q.ndim != 3 or k_cache.ndim != 4:
        raise ValueError("q must be [B, Hq, D] and k_cache [num_blocks, Hkv, block_size, D]")
    batch, hq, head_dim = q.shape
    num_blocks, hkv, block_size, d2 = k_cache.shape
    if d2 != head_dim:
        raise ValueError(f"head_dim mismatch: q {head_dim}, cache {d2}")
    _check("q", q, (batch, hq, head_dim), 2)
    _check("k_cache", k_cache, (num_blocks, hkv, block_size, head_dim), 2)
    _check("v_cache", v_cache, (num_blocks, hkv, block_size, head_dim), 2)
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [{batch}, max_blocks], got {tuple(block_tables.shape)}")
    _check("block_tables", block_tables, tuple(block_tables.shape), 4)
    _check("seq_lens", seq_lens, (batch,), 4)
    if block_tables.dtype.kind != "i" or seq_lens.dtype.kind != "i":
        raise ValueError("block_tables and seq_lens must be int32")
    if (k_new is None) != (v_new is None):
        raise ValueError("give both k_new and v_new, or neither")
    if k_new is not None:
        _check("k_new", k_new, (batch, hkv, head_dim), 2)
        _check("v_new", v_new, (batch, hkv, head_dim), 2)
    if out is None:
        out = np.empty((batch, hq, head_dim), dtype=np.uint16)
    _check("out", out, (batch, hq, head_dim), 2)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    rc = _native.attend_raw(
        _addr(q), _addr(k_new), _addr(v_new), _addr(out), _addr(k_cache), _addr(v_cache),
        _addr(block_tables), _addr(seq_lens), batch, hq, hkv, head_dim, block_size,
        int(block_tables.shape[1]), num_blocks, dtype_code(dtype), scale,
    )
    if rc != 0:
        raise KernelError(rc, "attend")
    return out
