"""CUDA graphs of the decode-only forward, one per padded batch size.

A decode iteration of an 8B model launches ~400 small kernels; from Python that costs tens of
milliseconds, several times the GPU's own work. Captured once into a graph per batch-size bucket,
one replay launches them all. A graph replays fixed addresses, so every input lives in a static
buffer sized for the largest bucket: the iteration's rows are copied in (one host-to-device copy of
a packed pinned buffer plus the block tables), rows beyond the batch up to the bucket are padding
that writes its KV into the pool's scratch block and attends one token of it.

On the CPU device nothing is captured and ``run`` calls the same forward over the same static
buffers: the padding and buffer logic are exercised in CI by that twin.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import numpy as np
import torch

from neo_common.protocol import IterationPlan, Place
from neo_gpu_worker.attention import AttentionMetadata
from neo_gpu_worker.batch import kv_slots
from neo_gpu_worker.models.protocol import CausalLM

log = logging.getLogger(__name__)

_IDS, _POS, _SLOT, _LEN = range(4)


def warm_up(device: torch.device, fn: Callable[[], object]) -> None:
    """Run ``fn`` once on a side stream, outside any capture: Triton compiles its kernels and cuBLAS
    picks its kernels and workspaces for these shapes, none of which may happen while capturing."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def capture(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn`` captured into a new graph (in memory pool ``pool`` if given), and what it returned."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def buckets_for(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (and ``max_batch`` itself). Every
    power of two up to the largest is a bucket, so a batch and its bucket round up to the same
    power of two (the decode kernel's split count depends on that alone)."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch} | set(range(16, max_batch + 1, 16)) | {max_batch}
    return sorted(sizes)


class DecodeGraphs:
    """Captured decode forwards and the static buffers they read.

    - ``buckets``: the batch sizes captured; a batch runs in the smallest bucket that holds it.
    - ``packed`` ``[4, max_batch]`` int64 on the device: token ids, positions, KV slots and context
      lengths of the rows; ``block_tables`` ``[max_batch, max_blocks]`` int32. Rewritten by every
      ``run`` (padding rows included, so stale rows of an earlier, larger batch never write KV).
    - ``graphs``: bucket -> (graph, its output hidden states), filled by ``capture``; on the CPU
      device the graph is None and ``run`` calls the forward.
    - ``pad_block``: the pool block padding rows use; the gateway never hands it out.
    - ``_host``/``_host_tables``: the pinned buffers ``run`` fills and copies from; ``_staged`` marks
      the end of the last copies (a plan may be launched before the previous one ran), so ``run``
      never rewrites a buffer a queued copy still reads.
    """

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, pad_block: int,
                 max_batch: int, max_model_len: int) -> None:
        self.model, self.kv_cache, self.block_size, self.pad_block = model, kv_cache, block_size, pad_block
        self.device = kv_cache.device
        self.buckets = buckets_for(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        pin = self.device.type == "cuda"
        self._host = torch.zeros((4, self.max_batch), dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros((self.max_batch, self.max_blocks), dtype=torch.int32, pin_memory=pin)
        self.packed = torch.zeros((4, self.max_batch), dtype=torch.int64, device=self.device)
        self.block_tables = torch.zeros((self.max_batch, self.max_blocks), dtype=torch.int32, device=self.device)
        self._pad_rows(0, self.max_batch)
        self.packed.copy_(self._host)
        self.block_tables.copy_(self._host_tables)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._staged: torch.cuda.Event | None = None   # marks the last copy out of the pinned buffers

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def can_run(self, plan: IterationPlan) -> bool:
        """Decode rows only, all in the GPU pool, within the largest bucket."""
        return (0 < plan.batch_size <= self.max_batch and bool(np.all(plan.num_tokens == 1))
                and bool(np.all(plan.places == Place.GPU)) and 0 < plan.block_tables.shape[1] <= self.max_blocks)

    def _pad_rows(self, start: int, stop: int) -> None:
        host = self._host.numpy()
        host[_IDS, start:stop] = 0
        host[_POS, start:stop] = 0
        host[_SLOT, start:stop] = self.pad_block * self.block_size
        host[_LEN, start:stop] = 1
        self._host_tables.numpy()[start:stop, 0] = self.pad_block

    def _forward(self, bucket: int) -> torch.Tensor:
        p = self.packed
        meta = AttentionMetadata.for_decodes(p[_SLOT, :bucket], self.block_tables[:bucket], p[_LEN, :bucket])
        return self.model(p[_IDS, :bucket], p[_POS, :bucket], self.kv_cache, meta)

    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        t0 = time.perf_counter()
        if self.device.type != "cuda":
            self.graphs = {b: (None, None) for b in self.buckets}
            return
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for bucket in reversed(self.buckets):
            forward = functools.partial(self._forward, bucket)
            warm_up(self.device, forward)
            graph, out = capture(forward, pool)
            pool = graph.pool()
            self.graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.device)
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s, %.0f MiB",
                 len(self.buckets), self.buckets[0], self.max_batch, time.perf_counter() - t0, used)

    def run(self, plan: IterationPlan, fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states ``[batch, hidden]`` of the plan's decode rows (plan order); ``fill``
        (rows, device tokens) overwrites placeholder token ids on the device."""
        batch = plan.batch_size
        bucket = self.bucket(batch)
        if self._staged is not None:
            # a plan launched ahead of the previous one's end: its copies may still be queued
            self._staged.synchronize()
        pos = plan.start_pos.astype(np.int64)
        tables = plan.block_tables
        host = self._host.numpy()
        host[_IDS, :batch] = plan.token_ids
        host[_POS, :batch] = pos
        host[_SLOT, :batch] = kv_slots(tables, np.arange(batch), pos, self.block_size)
        host[_LEN, :batch] = pos + 1
        self._pad_rows(batch, bucket)
        width = tables.shape[1]
        self._host_tables.numpy()[:batch, :width] = tables
        self.packed[:, :bucket].copy_(self._host[:, :bucket], non_blocking=True)
        self.block_tables[:bucket, :width].copy_(self._host_tables[:bucket, :width], non_blocking=True)
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()
        if fill is not None:
            self.packed[_IDS][fill[0]] = fill[1]
        graph, out = self.graphs[bucket]
        if graph is None:
            out = self._forward(bucket)
        else:
            graph.replay()
        return out[:batch]
