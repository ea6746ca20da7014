"""The shared-memory segment between the GPU worker and the cpu_attention process (one per replica).

One POSIX shared-memory object (``/dev/shm/<name>``, name from ``NeoConfig.shm_name``) holds the CPU
KV pool, per-stage staging slots and the doorbell words. The GPU worker creates it (it knows the
model geometry), registers ``[base_address, base_address + size)`` with ``cudaHostRegister`` so copies
run at pinned speed, and the cpu_attention process attaches and validates the header. Torch-free.

Layout (all offsets in bytes from the base; every region 4096-aligned, every control word on its own
64-byte cache line; integers little-endian):

====== ====================================================================================
0      header: magic ``NEOKVSG1`` (u64, written last: the segment is ready once it reads so),
       version u32, header bytes u32, total bytes u64, nonce u64 (random per creation), creator
       pid u32, dtype u32 (0 bf16, 1 fp16), num_layers, num_blocks, num_kv_heads, num_q_heads,
       head_dim, block_size, max_rows, num_slots (u32 each), scale f32, pad u32, then the region
       offsets: k_pool, v_pool, pool bytes, staging, slot bytes, q/k/v/o offsets inside a slot (u64).
512    ``abort`` u64 (GPU side): ``job_seq(iteration, 0)`` cancels that iteration's remaining jobs.
576    ``cpu_pid`` u64, 584 ``cpu_state`` u64 (cpu side: 0 detached, 1 attached, 2 exited).
1024   per slot s (s < 4), at ``1024 + 128 s``: ``req_seq`` u64 (GPU side); at ``+64``: ``done_seq``
       u64 and ``status`` i64 (cpu side; status is written before done_seq).
4096   K pool ``[num_layers, num_blocks, num_kv_heads, block_size, head_dim]`` (KV dtype)
       V pool, same shape
...    staging, per slot s: q ``[max_rows, num_q_heads, head_dim]``, k_new and v_new
       ``[max_rows, num_kv_heads, head_dim]``, o ``[max_rows, num_q_heads, head_dim]`` (KV dtype)
====== ====================================================================================

Doorbell protocol per slot (slot = pipeline sub-batch index), job ``seq = (iteration_id << 16) |
(layer + 1)`` (:func:`job_seq`): the GPU side fills q/k_new/v_new rows ``0..rows-1`` of the slot, then
stores ``req_seq = seq``; the cpu side appends k/v to the pool, writes o, stores ``status`` then
``done_seq = seq``; the GPU side waits for ``done_seq >= seq``, checks ``status`` (0 ok) and reads o.
Rows and block tables come over ZeroMQ in the iteration's ``CpuAttentionPlan``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import secrets
import struct
import time

import numpy as np

from neo_common.enums import CpuState, KvDtypeCode

log = logging.getLogger(__name__)

MAGIC = b"NEOKVSG1"
VERSION = 1
HEADER_BYTES = 4096
ALIGN = 4096
MAX_SLOTS = 4
ABORT_OFF = 512
CPU_PID_OFF = 576
CPU_STATE_OFF = 584
SLOT_CTRL_OFF = 1024
SLOT_CTRL_STRIDE = 128
DTYPE_CODES = {code.name: int(code) for code in KvDtypeCode}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}

# header after the magic: version, header bytes, total, nonce, pid, dtype, 8 geometry u32, scale, pad,
# 9 region u64
_HDR = struct.Struct("<IIQQII8IfI9Q")
_HDR_OFF = 8


class SegmentError(RuntimeError):
    """The segment is missing, not ready in time, or does not match what the caller expects."""


def job_seq(iteration_id: int, layer: int) -> int:
    """Doorbell value of (iteration, layer); increases over a run (layers < 65535)."""
    return (int(iteration_id) << 16) | (int(layer) + 1)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Geometry of a segment and the byte offsets derived from it (immutable).

    ``max_rows`` bounds the CPU rows of one sub-batch (use ``--max-num-seqs``); ``num_slots`` is the
    number of pipeline stages (2). ``scale`` 0 means ``1/sqrt(head_dim)``.
    """

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    block_size: int = 16
    max_rows: int = 256
    dtype: str = "bfloat16"
    num_slots: int = 2
    scale: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}")
        if not 1 <= self.num_slots <= MAX_SLOTS:
            raise ValueError(f"num_slots must be 1..{MAX_SLOTS}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError("num_q_heads must be a multiple of num_kv_heads")
        if min(self.num_layers, self.num_blocks, self.head_dim, self.block_size, self.max_rows) < 1:
            raise ValueError("every dimension must be >= 1")

    @classmethod
    def for_model(cls, geometry, num_blocks: int, block_size: int, max_rows: int, dtype: str) -> "SegmentLayout":
        """Layout for a ``neo_common.geometry.ModelGeometry``."""
        return cls(geometry.num_layers, num_blocks, geometry.num_kv_heads, geometry.num_heads,
                   geometry.head_dim, block_size, max_rows, dtype)

    # -- derived sizes -----------------------------------------------------------------------------
    @property
    def attn_scale(self) -> float:
        return self.scale or 1.0 / math.sqrt(self.head_dim)

    @property
    def pool_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def pool_bytes(self) -> int:
        return 2 * math.prod(self.pool_shape)

    @property
    def layer_bytes(self) -> int:
        return self.pool_bytes // self.num_layers

    @property
    def k_pool_off(self) -> int:
        return HEADER_BYTES

    @property
    def v_pool_off(self) -> int:
        return _align(self.k_pool_off + self.pool_bytes)

    @property
    def staging_off(self) -> int:
        return _align(self.v_pool_off + self.pool_bytes)

    @property
    def q_bytes(self) -> int:
        return 2 * self.max_rows * self.num_q_heads * self.head_dim

    @property
    def kv_row_bytes(self) -> int:
        return 2 * self.max_rows * self.num_kv_heads * self.head_dim

    @property
    def slot_offsets(self) -> dict[str, int]:
        """Offsets of q, k_new, v_new, o inside one staging slot."""
        q = 0
        k = _align(q + self.q_bytes)
        v = _align(k + self.kv_row_bytes)
        o = _align(v + self.kv_row_bytes)
        return {"q": q, "k_new": k, "v_new": v, "o": o}

    @property
    def slot_bytes(self) -> int:
        return _align(self.slot_offsets["o"] + self.q_bytes)

    @property
    def total_bytes(self) -> int:
        return self.staging_off + self.num_slots * self.slot_bytes

    def region(self, name: str, slot: int = 0) -> tuple[int, tuple[int, ...]]:
        """(byte offset, shape) of ``k_pool``, ``v_pool``, or a slot's ``q``/``k_new``/``v_new``/``o``."""
        if name == "k_pool":
            return self.k_pool_off, self.pool_shape
        if name == "v_pool":
            return self.v_pool_off, self.pool_shape
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside 0..{self.num_slots - 1}")
        heads = self.num_q_heads if name in ("q", "o") else self.num_kv_heads
        off = self.staging_off + slot * self.slot_bytes + self.slot_offsets[name]
        return off, (self.max_rows, heads, self.head_dim)

    @staticmethod
    def req_off(slot: int) -> int:
        return SLOT_CTRL_OFF + SLOT_CTRL_STRIDE * slot

    @staticmethod
    def done_off(slot: int) -> int:
        return SLOT_CTRL_OFF + SLOT_CTRL_STRIDE * slot + 64

    @staticmethod
    def status_off(slot: int) -> int:
        return SLOT_CTRL_OFF + SLOT_CTRL_STRIDE * slot + 72

    # -- header -----------------------------------------------------------------------------------
    def pack_header(self, nonce: int, pid: int) -> bytes:
        so = self.slot_offsets
        return _HDR.pack(
            VERSION, HEADER_BYTES, self.total_bytes, nonce, pid, DTYPE_CODES[self.dtype],
            self.num_layers, self.num_blocks, self.num_kv_heads, self.num_q_heads, self.head_dim,
            self.block_size, self.max_rows, self.num_slots, float(self.scale), 0,
            self.k_pool_off, self.v_pool_off, self.pool_bytes, self.staging_off, self.slot_bytes,
            so["q"], so["k_new"], so["v_new"], so["o"],
        )

    @classmethod
    def unpack_header(cls, buf) -> tuple["SegmentLayout", int, int]:
        """(layout, nonce, creator pid); raises SegmentError when the header is not one we can read."""
        if bytes(buf[:8]) != MAGIC:
            raise SegmentError("not a NEO KV segment (or not ready yet)")
        f = _HDR.unpack_from(buf, _HDR_OFF)
        version, header_bytes, total, nonce, pid, dtype = f[:6]
        if version != VERSION or header_bytes != HEADER_BYTES:
            raise SegmentError(f"segment version {version} != {VERSION}")
        layout = cls(f[6], f[7], f[8], f[9], f[10], f[11], f[12], DTYPE_NAMES.get(dtype, "?"), f[13], f[14])
        offsets = (layout.k_pool_off, layout.v_pool_off, layout.pool_bytes, layout.staging_off,
                   layout.slot_bytes, *layout.slot_offsets.values())
        if total != layout.total_bytes or tuple(f[16:]) != offsets:
            raise SegmentError("segment header offsets disagree with its geometry (other build?)")
        return layout, nonce, pid


def _shm_open(name: str, flags: int) -> int:
    import _posixshmem  # CPython's shm_open; avoids multiprocessing's resource tracker

    return _posixshmem.shm_open("/" + name.lstrip("/"), flags, mode=0o600)


def _shm_unlink(name: str) -> None:
    import _posixshmem

    _posixshmem.shm_unlink("/" + name.lstrip("/"))


def remove_stale(name: str) -> bool:
    """Unlink a segment left under ``name`` (by a crashed run of this replica); True if one existed."""
    try:
        _shm_unlink(name)
    except FileNotFoundError:
        return False
    log.info("removed stale shared-memory segment %s", name)
    return True


class KvSegment:
    """A mapped segment. Create with :meth:`create` (GPU worker) or :meth:`attach` (cpu_attention).

    Fields: ``name`` (POSIX name), ``layout`` (geometry and offsets, fixed), ``nonce`` (identifies
    this incarnation; :meth:`unlink` only removes the name while it still refers to it), ``owner``
    (True in the creating process), ``buf`` (uint8 view of the whole mapping, None after
    :meth:`close`). Views returned by the accessors alias the mapping; drop them before close().
    """

    def __init__(self, name: str, layout: SegmentLayout, mm: mmap.mmap, nonce: int, owner: bool,
                 creator_pid: int = 0) -> None:
        self.name = name
        self.layout = layout
        self.nonce = nonce
        self.owner = owner
        self.creator_pid = creator_pid or os.getpid()
        self._mm: mmap.mmap | None = mm
        self.buf: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)
        self._words = self.buf[:HEADER_BYTES].view(np.uint64)

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, layout: SegmentLayout) -> "KvSegment":
        """Create (replacing a stale segment of the same name), size, map and publish the header."""
        remove_stale(name)
        fd = _shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        try:
            os.ftruncate(fd, layout.total_bytes)
            mm = mmap.mmap(fd, layout.total_bytes)
        except OSError as exc:
            os.close(fd)
            _shm_unlink(name)
            raise SegmentError(f"cannot size segment {name} to {layout.total_bytes} bytes "
                               f"(is /dev/shm large enough?): {exc}") from exc
        os.close(fd)
        nonce = secrets.randbits(63)
        mm[_HDR_OFF:_HDR_OFF + _HDR.size] = layout.pack_header(nonce, os.getpid())
        mm[0:8] = MAGIC  # last: attachers wait for it
        log.info("created segment %s: %.1f MiB (%s)", name, layout.total_bytes / 2**20, layout)
        return cls(name, layout, mm, nonce, owner=True)

    @classmethod
    def attach(cls, name: str, timeout_s: float = 0.0, expect: SegmentLayout | None = None,
               populate: bool = False) -> "KvSegment":
        """Map an existing segment, waiting up to ``timeout_s`` for it to appear and be ready.

        ``populate`` maps every page up front (MAP_POPULATE), so serving never takes a first-touch
        page fault (tens of microseconds per job otherwise, on the handoff's critical path).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return cls._attach_once(name, expect, populate)
            except (FileNotFoundError, SegmentError) as exc:
                if isinstance(exc, SegmentError) and "not ready" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise SegmentError(f"segment {name} not ready after {timeout_s:.1f}s: {exc}") from None
                time.sleep(0.02)

    @classmethod
    def _attach_once(cls, name: str, expect: SegmentLayout | None, populate: bool = False) -> "KvSegment":
        fd = _shm_open(name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise SegmentError("segment header not ready yet")
            mm = mmap.mmap(fd, HEADER_BYTES)
            try:  # validate before mapping (and maybe populating) the whole thing
                layout, _, _ = SegmentLayout.unpack_header(mm)
            finally:
                mm.close()
            if layout.total_bytes != size:
                raise SegmentError(f"segment {name} is {size} bytes, header says {layout.total_bytes}")
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            t0 = time.monotonic()
            mm = mmap.mmap(fd, size, flags=flags)
            if populate:
                log.info("mapped segment %s with all %d MiB populated in %.2fs", name, size >> 20,
                         time.monotonic() - t0)
        finally:
            os.close(fd)
        try:
            layout, nonce, creator = SegmentLayout.unpack_header(mm)
            if expect is not None and expect != layout:
                raise SegmentError(f"segment {name} geometry {layout} != expected {expect}")
        except BaseException:
            mm.close()
            raise
        return cls(name, layout, mm, nonce, owner=False, creator_pid=creator)

    def close(self) -> None:
        """Unmap (idempotent). Fails softly while views are still alive (they keep the mapping)."""
        if self._mm is None:
            return
        self.buf = None
        self._words = None
        try:
            self._mm.close()
        except BufferError:
            log.debug("segment %s: views still alive; unmapped when they go", self.name)
        self._mm = None

    def _name_nonce(self) -> int | None:
        """Nonce of the segment the name refers to now (None: no ready segment under the name)."""
        try:
            fd = _shm_open(self.name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, _HDR_OFF + _HDR.size, 0)
        finally:
            os.close(fd)
        if len(head) < _HDR_OFF + _HDR.size or head[:8] != MAGIC:
            return None
        return _HDR.unpack_from(head, _HDR_OFF)[3]

    def is_current(self) -> bool:
        """Whether the name still refers to this incarnation (a restarted GPU worker makes a new one)."""
        return self._name_nonce() == self.nonce

    def unlink(self) -> bool:
        """Remove the name if it still refers to this incarnation; True if removed."""
        nonce = self._name_nonce()
        if nonce is not None and nonce != self.nonce:
            log.info("segment %s now belongs to another incarnation; not removing it", self.name)
            return False
        try:
            _shm_unlink(self.name)
        except FileNotFoundError:
            return False
        log.info("removed segment %s", self.name)
        return True

    def __enter__(self) -> "KvSegment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()

    # -- addresses and views ----------------------------------------------------------------------
    @property
    def base_address(self) -> int:
        """Address of byte 0 in this process (for cudaHostRegister; the size is ``layout.total_bytes``)."""
        return self.buf.__array_interface__["data"][0]

    @property
    def size(self) -> int:
        return self.layout.total_bytes

    def view(self, name: str, slot: int = 0) -> np.ndarray:
        """uint16 view (raw bf16/fp16 bits) of a region; see :meth:`SegmentLayout.region`."""
        off, shape = self.layout.region(name, slot)
        return self.buf[off:off + 2 * math.prod(shape)].view(np.uint16).reshape(shape)

    def k_pool(self) -> np.ndarray:
        return self.view("k_pool")

    def v_pool(self) -> np.ndarray:
        return self.view("v_pool")

    def address(self, name: str, slot: int = 0) -> int:
        return self.base_address + self.layout.region(name, slot)[0]

    # -- control words ----------------------------------------------------------------------------
    def _word(self, off: int) -> int:
        return int(self._words[off // 8])

    def _store(self, off: int, value: int) -> None:
        from neo_common.host_kernel import _native

        _native.store_u64(self.base_address + off, int(value) & (2**64 - 1))

    def req_seq(self, slot: int) -> int:
        return self._word(SegmentLayout.req_off(slot))

    def done_seq(self, slot: int) -> int:
        return self._word(SegmentLayout.done_off(slot))

    def status(self, slot: int) -> int:
        return int(self._words[SegmentLayout.status_off(slot) // 8].astype(np.int64))

    def ring(self, slot: int, seq: int) -> None:
        """GPU side: slot's inputs for job ``seq`` are in place (call after the copies completed)."""
        self._store(SegmentLayout.req_off(slot), seq)

    def abort(self, iteration_id: int) -> None:
        """GPU side: give up on the rest of ``iteration_id`` (the cpu side stops waiting for it)."""
        self._store(ABORT_OFF, job_seq(iteration_id, 0))

    def wait_done(self, slot: int, seq: int, timeout_s: float = 120.0, spin_us: int = 2000) -> int:
        """GPU side: wait for job ``seq`` of ``slot``; returns its status (0 ok, <0 a kernel error).

        Raises TimeoutError after ``timeout_s`` (the cpu_attention process is gone or stuck).
        """
        from neo_common.host_kernel import _native

        _, flag = _native.wait_u64(self.base_address + SegmentLayout.done_off(slot), seq, spin_us,
                                   int(timeout_s * 1e6))
        if flag:
            raise TimeoutError(f"cpu attention job {seq:#x} of slot {slot} not done after {timeout_s}s")
        return self.status(slot)

    def set_cpu_state(self, pid: int, state: CpuState) -> None:
        """cpu side: who serves the segment (pid) and whether it is attached (1) or exited (2)."""
        self._store(CPU_PID_OFF, pid)
        self._store(CPU_STATE_OFF, state)

    def cpu_state(self) -> tuple[int, CpuState]:
        return self._word(CPU_PID_OFF), CpuState(self._word(CPU_STATE_OFF))
