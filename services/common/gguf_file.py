"""A fast reader of GGUF headers (metadata and tensor directory) over a memory map.

The `gguf` package's reader parses every element of the vocabulary arrays through numpy views,
which takes seconds for a 49k-token vocabulary; this reader takes milliseconds. Tensor payloads are
returned as raw byte views for `gguf.dequantize`, so the quantization formats stay the package's.
"""

from __future__ import annotations

import dataclasses
import struct
from functools import lru_cache
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``shape`` in numpy (row-major) order, ``qtype`` a GGMLQuantizationType
    value, ``offset``/``nbytes`` of its payload within the file."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    nbytes: int


class GGUFFile:
    """Metadata (``metadata``: key -> value, arrays as lists) and the tensor directory of one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)
        self._pos = 0
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        self._pos = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need >= 2)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        raw = []
        for _ in range(n_tensors):
            name = self._string()
            (ndims,) = self._unpack("<I")
            dims = self._unpack("<" + "Q" * ndims)
            qtype, offset = self._unpack("<IQ")
            raw.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: list[TensorInfo] = []
        for name, shape, qtype, offset in raw:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            nbytes = int(np.prod(shape)) // block * type_size
            self.tensors.append(TensorInfo(name, shape, qtype, data_start + offset, nbytes))

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos:self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        (value,) = self._unpack(_SCALARS[vtype])
        return value

    def tensor_data(self, t: TensorInfo) -> np.ndarray:
        """Raw payload shaped as `gguf.dequantize` expects: [..., row bytes] (or typed for F32/F16)."""
        from gguf.constants import GGMLQuantizationType

        flat = self._map[t.offset:t.offset + t.nbytes]
        if t.qtype == GGMLQuantizationType.F32:
            return flat.view(np.float32).reshape(t.shape)
        if t.qtype == GGMLQuantizationType.F16:
            return flat.view(np.float16).reshape(t.shape)
        return flat.reshape(*t.shape[:-1], -1)


@lru_cache(maxsize=4)
def open_gguf(path: str) -> GGUFFile:
    return GGUFFile(path)
