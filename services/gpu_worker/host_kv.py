"""The GPU worker's side of the shared KV segment: create it, pin it for CUDA, view it as tensors.

The cpu_attention process attaches the same segment by name. Registering the mapping with
``cudaHostRegister`` makes device<->host copies into it run at pinned speed (no staging through a
driver bounce buffer); on a machine without CUDA the views work the same, unpinned.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from neo_common.segment import KvSegment, SegmentLayout
from neo_gpu_worker.batch import to_device
from neo_gpu_worker.cuda_dma import MAX_PITCH, Dma2d

log = logging.getLogger(__name__)

STAGING_BYTES = 64 * 2**20   # KV one swap stages on the device at a time (a swap may be a whole 32k context)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class HostKv:
    """A created segment plus torch views of its regions.

    - ``segment``: the mapping (owned: removed by :meth:`close`).
    - ``pinned``: whether CUDA registered the mapping (only on a CUDA machine, once).
    - ``k_pool``/``v_pool``: ``[layers, blocks, kv_heads, block_size, head_dim]`` tensors over the pool.
    - ``dma``: the 2-D copy swaps use on CUDA (``cuda_dma``; None: one copy per layer).
    """

    def __init__(self, name: str, layout: SegmentLayout, pin: bool | None = None) -> None:
        self.segment = KvSegment.create(name, layout)
        self.dtype = _DTYPES[layout.dtype]
        self.pinned = False
        if pin if pin is not None else torch.cuda.is_available():
            err = torch.cuda.cudart().cudaHostRegister(self.segment.base_address, self.segment.size, 0)
            if int(err) != 0:
                self.segment.close()
                self.segment.unlink()
                raise RuntimeError(f"cudaHostRegister of {self.segment.size} bytes failed with error {int(err)}")
            self.pinned = True
        self.k_pool = self.region("k_pool")
        self.v_pool = self.region("v_pool")
        self.dma = Dma2d.load() if self.pinned else None
        if self.dma is not None and self.k_pool.stride(0) * self.k_pool.element_size() > MAX_PITCH:
            log.info("host pool layers of over %d bytes: KV swaps copy layer by layer", MAX_PITCH)
            self.dma = None
        log.info("host KV segment %s: %.2f GiB%s", name, self.segment.size / 2**30, " (pinned)" if self.pinned else "")

    def region(self, name: str, slot: int = 0) -> torch.Tensor:
        """A tensor aliasing one region of the segment (no copy)."""
        array = self.segment.view(name, slot)
        return torch.from_numpy(array).view(self.dtype)

    # -- copies between the GPU pool layout [blocks, bs, H, D] and the host's [blocks, H, bs, D] ----
    def swap_out(self, kv_cache: torch.Tensor, runs) -> None:
        """GPU pool blocks -> host pool blocks, all layers; ``runs`` rows are (gpu, host, count).
        On CUDA the copy is queued on the current stream (the host does not wait), in chunks of at
        most :data:`STAGING_BYTES`: a gather of the chunk's blocks into the host layout, then one
        DMA per run and side. Work queued after it on the stream (the forward overwriting those
        GPU blocks) runs after it."""
        runs = np.asarray(runs, np.int64).reshape(-1, 3)
        if not len(runs):
            return
        if not kv_cache.is_cuda:
            self._copy_on_cpu(kv_cache, runs, to_host=True)
            return
        for chunk in _chunks(runs, _staged_blocks(kv_cache)):
            blocks = to_device(kv_cache.device)(_block_ids(chunk[:, 0], chunk[:, 2]))
            staged = kv_cache[:, :, blocks].permute(1, 0, 2, 4, 3, 5).contiguous()   # [2, L, N, H, bs, D]
            self._copy_runs(staged, chunk[:, 1], chunk[:, 2], to_host=True)

    def swap_in(self, kv_cache: torch.Tensor, runs) -> None:
        """Host pool blocks -> GPU pool blocks, all layers; ``runs`` rows are (host, gpu, count).
        On CUDA queued on the current stream like :meth:`swap_out`, chunk by chunk: one DMA per
        run and side into a staging tensor, then one scatter into the pool."""
        runs = np.asarray(runs, np.int64).reshape(-1, 3)
        if not len(runs):
            return
        if not kv_cache.is_cuda:
            self._copy_on_cpu(kv_cache, runs, to_host=False)
            return
        layers, _, _, block_size, heads, head_dim = kv_cache.shape
        for chunk in _chunks(runs, _staged_blocks(kv_cache)):
            staged = torch.empty((2, layers, int(chunk[:, 2].sum()), heads, block_size, head_dim),
                                 dtype=kv_cache.dtype, device=kv_cache.device)
            self._copy_runs(staged, chunk[:, 0], chunk[:, 2], to_host=False)
            blocks = to_device(kv_cache.device)(_block_ids(chunk[:, 1], chunk[:, 2]))
            kv_cache[:, :, blocks] = staged.permute(1, 0, 2, 4, 3, 5)

    def _copy_on_cpu(self, kv_cache: torch.Tensor, runs: np.ndarray, to_host: bool) -> None:
        """The swap on the CPU device: strided copies, every layer of a run and side at once."""
        for a, b, n in runs.tolist():
            gpu_start, host_start = (a, b) if to_host else (b, a)
            for side, pool in enumerate((self.k_pool, self.v_pool)):
                pooled = kv_cache[:, side, gpu_start:gpu_start + n].transpose(-3, -2)
                host = pool[:, host_start:host_start + n]
                (host if to_host else pooled).copy_(pooled if to_host else host)

    def _copy_runs(self, staged: torch.Tensor, host_starts: np.ndarray, counts: np.ndarray,
                   to_host: bool) -> None:
        """Between ``staged[side, :, offset:offset + n]`` (runs back to back) and host blocks
        ``start .. start + n`` of every layer: one 2-D DMA per run and side, else one copy per
        layer (no 2-D copy available)."""
        size = staged.element_size()
        offset = 0
        for start, n in zip(host_starts.tolist(), counts.tolist()):
            for side, pool in enumerate((self.k_pool, self.v_pool)):
                dev, host = staged[side, :, offset:offset + n], pool[:, start:start + n]
                dst, src = (host, dev) if to_host else (dev, host)
                if self.dma is not None:
                    self.dma.copy(dst, dst.stride(0) * size, src, src.stride(0) * size,
                                  dev[0].numel() * size, dev.shape[0])
                    continue
                for layer in range(dev.shape[0]):
                    dst[layer].copy_(src[layer], non_blocking=True)
            offset += n

    def stream_out(self, layer: int, staging: torch.Tensor, runs, side_stream=None) -> None:
        """One layer of CPU-bound prefill KV from the staging area ``[2, blocks, bs, H, D]`` to its
        host blocks (``runs``: staging block, host block, count). The used staging blocks are
        transposed to the host layout in one kernel on the compute stream (so the staging area can be
        overwritten by the next layer at once); on CUDA the copies to the host go on ``side_stream``,
        overlapping the next layer's work: one per run and side, behind one event."""
        if not len(runs):
            return
        used = int((runs[:, 0] + runs[:, 2]).max())
        blocks = staging[:, :used].transpose(2, 3).contiguous()   # [2, used, H, bs, D]
        if side_stream is None:
            for src, dst, n in runs.tolist():
                self.k_pool[layer, dst:dst + n].copy_(blocks[0, src:src + n])
                self.v_pool[layer, dst:dst + n].copy_(blocks[1, src:src + n])
            return
        ready = torch.cuda.Event()
        ready.record()
        side_stream.wait_event(ready)
        with torch.cuda.stream(side_stream):
            k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
            for src, dst, n in runs.tolist():
                k_pool[dst:dst + n].copy_(blocks[0, src:src + n], non_blocking=True)
                v_pool[dst:dst + n].copy_(blocks[1, src:src + n], non_blocking=True)
        blocks.record_stream(side_stream)

    def close(self) -> None:
        self.k_pool = self.v_pool = None  # drop aliases before the mapping goes
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.segment.base_address)
            self.pinned = False
        self.segment.close()
        self.segment.unlink()


def _staged_blocks(kv_cache: torch.Tensor) -> int:
    """Blocks (every layer, both sides) one staging chunk holds."""
    per_block = kv_cache[:, :, 0].numel() * kv_cache.element_size()
    return max(1, STAGING_BYTES // per_block)


def _chunks(runs: np.ndarray, max_blocks: int):
    """``runs`` (src, dst, count) regrouped into chunks of at most ``max_blocks`` blocks, a run
    longer than that split across chunks."""
    chunk, size = [], 0
    for src, dst, n in runs.tolist():
        while n:
            take = min(n, max_blocks - size)
            chunk.append((src, dst, take))
            src, dst, n, size = src + take, dst + take, n - take, size + take
            if size == max_blocks:
                yield np.array(chunk, np.int64)
                chunk, size = [], 0
    if chunk:
        yield np.array(chunk, np.int64)


def _block_ids(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The block ids of runs ``start .. start + count``, run after run."""
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts.tolist(), counts.tolist())])
