"""The GPU worker's side of the shared KV segment: create it, pin it for CUDA, view it as tensors.

The cpu_attention process attaches the same segment by name. Registering the mapping with
``cudaHostRegister`` makes device<->host copies into it run at pinned speed (no staging through a
driver bounce buffer); on a machine without CUDA the views work the same, unpinned.
"""

from __future__ import annotations

import logging

import torch

from neo_common.segment import KvSegment, SegmentLayout

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class HostKv:
    """A created segment plus torch views of its regions.

    - ``segment``: the mapping (owned: removed by :meth:`close`).
    - ``pinned``: whether CUDA registered the mapping (only on a CUDA machine, once).
    - ``k_pool``/``v_pool``: ``[layers, blocks, kv_heads, block_size, head_dim]`` tensors over the pool.
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
        log.info("host KV segment %s: %.2f GiB%s", name, self.segment.size / 2**30, " (pinned)" if self.pinned else "")

    def region(self, name: str, slot: int = 0) -> torch.Tensor:
        """A tensor aliasing one region of the segment (no copy)."""
        array = self.segment.view(name, slot)
        return torch.from_numpy(array).view(self.dtype)

    # -- copies between the GPU pool layout [blocks, bs, H, D] and the host's [blocks, H, bs, D] ----
    def swap_out(self, kv_cache: torch.Tensor, runs) -> None:
        """GPU pool blocks -> host pool blocks, all layers; ``runs`` rows are (gpu, host, count)."""
        for src, dst, n in runs.tolist():
            for layer in range(kv_cache.shape[0]):
                for side, pool in ((0, self.k_pool), (1, self.v_pool)):
                    pool[layer, dst:dst + n].copy_(kv_cache[layer, side, src:src + n].transpose(1, 2),
                                                   non_blocking=True)

    def swap_in(self, kv_cache: torch.Tensor, runs) -> None:
        """Host pool blocks -> GPU pool blocks, all layers; ``runs`` rows are (host, gpu, count)."""
        device = kv_cache.device
        for src, dst, n in runs.tolist():
            for layer in range(kv_cache.shape[0]):
                for side, pool in ((0, self.k_pool), (1, self.v_pool)):
                    block = pool[layer, src:src + n].to(device, non_blocking=True)  # contiguous: one DMA
                    kv_cache[layer, side, dst:dst + n].copy_(block.transpose(1, 2))

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
