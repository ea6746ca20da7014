"""Run one iteration plan: build the flat batch, run the model over the paged KV pool, sample.

The runner is the worker's only state besides the weights: the KV pool ``[layers, 2, blocks,
block_size, kv_heads, head_dim]``, whose contents the gateway's block manager accounts for.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from neo_common.protocol import IterationPlan, IterationResult, Place
from neo_gpu_worker.attention import AttentionMetadata, PrefillSpan
from neo_gpu_worker.model import LlamaModel
from neo_gpu_worker.sampler import SamplingBatch, sample

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model and the KV pool on one device.

    - ``kv_cache``: allocated once at start; ``num_blocks`` of ``block_size`` tokens per layer.
    - ``generator``: device RNG for unseeded sampling.
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        g = model.geometry
        self.model, self.device, self.block_size, self.num_blocks = model, device, block_size, num_blocks
        self.kv_cache = torch.zeros((g.num_layers, 2, num_blocks, block_size, g.num_kv_heads, g.head_dim),
                                    dtype=dtype, device=device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    # -- batch construction -------------------------------------------------------------------
    def prepare(self, plan: IterationPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, np.ndarray]:
        """Flat token ids, positions, attention metadata, and the flat index of each sampled row."""
        if plan.batch_size and np.any(plan.places != Place.GPU):
            raise ValueError("plan holds CPU-resident rows but this worker has no CPU attention attached")
        bs = self.block_size
        n = plan.num_tokens.astype(np.int64)
        ends = np.cumsum(n)
        starts = ends - n
        total = int(ends[-1]) if len(n) else 0
        row = np.repeat(np.arange(len(n)), n)
        pos = plan.start_pos.astype(np.int64)[row] + (np.arange(total) - starts[row])
        bt = plan.block_tables.astype(np.int64)
        if np.any(bt[row, pos // bs] < 0):
            raise ValueError("a token's position lies beyond its block table")
        slots = bt[row, pos // bs] * bs + pos % bs

        dec = np.flatnonzero(n == 1)
        seq_lens = plan.start_pos.astype(np.int64)[dec] + 1
        width = int(seq_lens.max()) if len(dec) else 0
        j = np.arange(width)
        mask = j[None, :] < seq_lens[:, None]
        dslots = np.where(mask, bt[dec][:, j // bs] * bs + j % bs, 0) if len(dec) else np.zeros((0, 0), np.int64)

        to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)  # noqa: E731
        prefills = []
        for r in np.flatnonzero(n > 1):
            length = int(plan.start_pos[r] + n[r])
            k = np.arange(length)
            prefills.append(PrefillSpan(int(starts[r]), int(n[r]), int(plan.start_pos[r]),
                                        to_dev(bt[r, k // bs] * bs + k % bs)))
        meta = AttentionMetadata(slot_mapping=to_dev(slots), decode_token_idx=to_dev(starts[dec]),
                                 decode_slots=to_dev(dslots), decode_mask=to_dev(mask), prefills=prefills)
        sample_rows = np.flatnonzero(plan.sample)
        return to_dev(plan.token_ids.astype(np.int64)), to_dev(pos), meta, (ends - 1)[sample_rows]

    # -- execution ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> IterationResult:
        t0 = time.perf_counter()
        self.copy_blocks(plan)
        result = IterationResult(iteration_id=plan.iteration_id)
        if plan.batch_size == 0:
            return result
        input_ids, positions, meta, last_idx = self.prepare(plan)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        t1 = time.perf_counter()
        sample_rows = np.flatnonzero(plan.sample)
        if len(sample_rows):
            logits = self.model.compute_logits(hidden[torch.from_numpy(last_idx).to(self.device)])
            params = SamplingBatch.from_columns(
                plan.temperature[sample_rows], plan.top_p[sample_rows], plan.top_k[sample_rows],
                plan.seeds[sample_rows], plan.steps[sample_rows], logits.shape[-1], self.device)
            tokens = sample(logits, params, self.generator).to(torch.int32).cpu().numpy()
            result.seq_ids = plan.seq_ids[sample_rows]
            result.token_ids = tokens
        t2 = time.perf_counter()
        result.forward_s, result.sample_s, result.total_s = t1 - t0, t2 - t1, t2 - t0
        return result

    def copy_blocks(self, plan: IterationPlan) -> None:
        """GPU<->host swaps need the CPU pool, which arrives with CPU offloading."""
        if len(plan.swap_out) or len(plan.swap_in):
            raise ValueError("plan asks for swaps but this worker has no host KV pool attached")


def kv_block_bytes(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
    return model.geometry.kv_bytes_per_block(block_size, torch.empty((), dtype=dtype).element_size())


def num_kv_blocks(model: LlamaModel, device: torch.device, block_size: int, dtype: torch.dtype,
                  requested: int, gpu_memory_utilization: float, cpu_device_kv_gb: float) -> int:
    """Blocks to allocate: as asked, else what fits in the device memory budget after the weights."""
    if requested:
        return requested
    per_block = kv_block_bytes(model, block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
        # Leave room for activations of a full iteration (a generous fixed margin).
        budget = total * gpu_memory_utilization - used_by_others - 2 * 1024**3
    else:
        budget = cpu_device_kv_gb * 1024**3
    blocks = int(budget // per_block)
    if blocks < 16:
        raise RuntimeError(f"only {blocks} KV blocks fit; lower the model size or raise --gpu-memory-utilization")
    return blocks
