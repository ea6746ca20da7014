"""Dense layers over GGUF blocks on the CPU device: ``y = x @ W.T`` without a float32 copy of ``W``.

A GGUF weight stays as its raw blocks (``QuantBlocks``: 32 values per block, row-major, so a row of
the matrix is a run of whole blocks) and the native kernel (``csrc/``, built as
``neo_gpu_worker._quant_dense``) dequantizes each block in registers as it multiplies. A decode step
then reads ~5.6x fewer bytes than over float32 weights (Q4_1: 20 bytes per 32 values instead of 128;
the Q8_0 head 34), and the CPU device's decode is bound by those bytes.

What the kernel guarantees (``csrc/quant_dense.h`` states the order):

- each weight value is ``dequant.dequantize``'s float32 value (``d * q``, plus ``m`` for Q4_1, two
  roundings), so the products are the float32 path's; only the summation order differs from it;
- **batch-invariant**: a row's output bits depend only on that row (one fixed accumulation order per
  output, whatever the row count), which the offload/pipeline equivalence relies on;
- **thread-invariant**: threads split the output columns (N), never K; the count is torch's
  (``torch.get_num_threads``), which the worker sets.

``QuantLinear`` is the module that replaces an ``nn.Linear`` whose weight arrived as blocks (the
loader decides, ``adopt``); the tied LM head runs on the embedding's blocks (``model.py``'s ``tied_head``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

try:
    from neo_gpu_worker import _quant_dense as _native
except ImportError:   # built by setup.py; a tree without a compiler keeps the float32 path
    _native = None

QK = 32   # values per block


class BlockFormat(enum.IntEnum):
    """The GGUF block formats the kernel reads (values: GGML type ids)."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8

    @property
    def block_bytes(self) -> int:
        return {BlockFormat.Q4_0: 18, BlockFormat.Q4_1: 20, BlockFormat.Q8_0: 34}[self]


class Isa(enum.IntEnum):
    """Which build of the kernel runs: the best this CPU has, or one named (tests compare them)."""

    AUTO = 0
    GENERIC = 1
    AVX2 = 2


def available() -> bool:
    return _native is not None


def isa_name(isa: Isa = Isa.AUTO) -> str:
    return _native.isa_name(int(isa)) if _native else "none"


@dataclasses.dataclass(frozen=True)
class QuantBlocks:
    """A block-quantized ``[rows, cols]`` matrix as its raw GGUF bytes: ``data`` is uint8
    ``[rows, cols / 32, block_bytes]`` (contiguous: row r's blocks, in order)."""

    fmt: BlockFormat
    data: torch.Tensor

    def __post_init__(self) -> None:
        # the native kernel reads raw addresses: the layout must be exactly this
        d = self.data
        if (d.dtype != torch.uint8 or d.dim() != 3 or d.shape[2] != self.fmt.block_bytes or d.device.type != "cpu"
                or not d.is_contiguous()):
            raise ValueError(f"{self.fmt.name} blocks must be contiguous uint8 [rows, cols/32, "
                             f"{self.fmt.block_bytes}] on the CPU, got {d.dtype} {tuple(d.shape)}")

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def cols(self) -> int:
        return self.data.shape[1] * QK

    @staticmethod
    def from_gguf(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> "QuantBlocks | None":
        """The blocks of a GGUF tensor of ``shape`` (rows, cols), or None for a format the kernel
        does not read (or a shape that is not a matrix)."""
        try:
            fmt = BlockFormat(int(qtype))
        except ValueError:
            return None
        if len(shape) != 2 or shape[1] % QK:
            return None
        data = np.array(raw, copy=True).view(np.uint8).reshape(shape[0], shape[1] // QK, fmt.block_bytes)
        return QuantBlocks(fmt, torch.from_numpy(data))

    def narrow(self, axis: int, start: int, length: int) -> "QuantBlocks | None":
        """Rows (axis 0) or columns (axis 1) ``[start, start + length)``; None where columns do not
        fall on block boundaries (the caller keeps the float32 weight then)."""
        if axis == 0:
            return QuantBlocks(self.fmt, self.data.narrow(0, start, length))
        if start % QK or length % QK:
            return None
        return QuantBlocks(self.fmt, self.data.narrow(1, start // QK, length // QK).contiguous())

    @staticmethod
    def cat(parts: list[tuple[int, "QuantBlocks"]], rows: int) -> "QuantBlocks | None":
        """The parts ``(first row, blocks)`` stacked into one ``rows``-row matrix (a fused layer:
        q/k/v, gate/up), or None unless they tile it exactly in one format."""
        parts = sorted(parts, key=lambda p: p[0])
        at = 0
        for first, blocks in parts:
            if first != at or blocks.fmt != parts[0][1].fmt or blocks.cols != parts[0][1].cols:
                return None
            at += blocks.rows
        if at != rows:
            return None
        data = torch.cat([b.data for _, b in parts]) if len(parts) > 1 else parts[0][1].data.contiguous()
        return QuantBlocks(parts[0][1].fmt, data)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, isa: Isa = Isa.AUTO,
               threads: int | None = None) -> torch.Tensor:
        """``x [M, cols]`` float32 -> ``x @ W.T (+ bias)`` ``[M, rows]`` float32."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.cols:
            raise ValueError(f"x must be float32 [M, {self.cols}] on the CPU, got {x.dtype} {tuple(x.shape)}")
        if x.stride(1) != 1:
            x = x.contiguous()
        if bias is not None:
            bias = bias.detach().contiguous()
            if bias.dtype != torch.float32 or bias.shape != (self.rows,):
                raise ValueError(f"bias must be float32 [{self.rows}]")
        y = torch.empty(x.shape[0], self.rows, dtype=torch.float32)
        _native.matmul(int(self.fmt), self.data.data_ptr(), self.rows, self.cols, x.data_ptr(), x.shape[0],
                       x.stride(0), y.data_ptr(), y.stride(0), 0 if bias is None else bias.data_ptr(),
                       torch.get_num_threads() if threads is None else threads, int(isa))
        return y

    def lookup(self, ids: torch.Tensor, isa: Isa = Isa.AUTO) -> torch.Tensor:
        """Rows ``ids`` dequantized, float32 ``[len(ids), cols]`` (an embedding lookup)."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise IndexError(f"token id out of range [0, {self.rows})")
        out = torch.empty(flat.numel(), self.cols, dtype=torch.float32)
        _native.rows(int(self.fmt), self.data.data_ptr(), self.cols, flat.data_ptr(), flat.numel(),
                     out.data_ptr(), int(isa))
        return out.view(*ids.shape, self.cols)


class QuantLinear(nn.Module):
    """A dense layer over ``QuantBlocks`` (float32 activations on the CPU device), with the
    ``nn.Linear`` it replaced's optional float32 ``bias``."""

    def __init__(self, blocks: QuantBlocks, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = blocks.cols, blocks.rows
        self.blocks = blocks
        self.register_buffer("qweight", blocks.data, persistent=False)   # counted as the module's memory
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.blocks.fmt.name}"


class QuantEmbedding(nn.Module):
    """The token embedding over ``QuantBlocks``: a lookup dequantizes the rows it reads (the same
    float32 values as a dequantized table), and a tied LM head multiplies by the blocks."""

    def __init__(self, blocks: QuantBlocks) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = blocks.rows, blocks.cols
        self.blocks = blocks
        self.register_buffer("qweight", blocks.data, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks.lookup(ids)
