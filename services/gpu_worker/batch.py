"""Flat token batches of an iteration plan: token ids, positions and paged-attention metadata.

GPU-only iterations are one flat batch over the GPU pool. With offloading, each pipeline sub-batch
is a flat batch whose rows are ordered in three contiguous parts, so every part is a slice of the
sub-batch's tensors (no gathers):

1. rows whose KV is in the GPU pool (prefill chunks and decodes);
2. CPU-bound prefills: their KV is written to a one-layer GPU staging area, attended there, and
   copied to their host-pool blocks after each layer (``stage_runs``);
3. CPU decodes (KV in the host pool, one token each): their q/k/v go to the shared segment's
   staging slot of the sub-batch, in this order, and the cpu_attention process attends them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from neo_common.block_runs import merge_runs
from neo_common.protocol import IterationPlan, Place
from neo_gpu_worker.attention import AttentionMetadata, PrefillSpan


def to_device(device: torch.device):
    """numpy -> ``device`` without a host sync (the source is staged by the driver, never waited on)."""
    return lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


def flat_batch(plan: IterationPlan, rows: np.ndarray, tables: np.ndarray, block_size: int,
               device: torch.device) -> tuple[np.ndarray, AttentionMetadata]:
    """Positions and metadata for ``rows`` of ``plan`` over block tables ``tables`` (one per row);
    token indices in the metadata count from the first of these rows."""
    bs = block_size
    n = plan.num_tokens[rows].astype(np.int64)
    start_pos = plan.start_pos[rows].astype(np.int64)
    ends = np.cumsum(n)
    starts = ends - n
    total = int(ends[-1]) if len(n) else 0
    row = np.repeat(np.arange(len(n)), n)
    pos = start_pos[row] + (np.arange(total) - starts[row])
    bt = tables.astype(np.int64)
    slots = kv_slots(bt, row, pos, bs)

    dec = np.flatnonzero(n == 1)
    seq_lens = (start_pos[dec] + 1).astype(np.int32)

    to_dev = to_device(device)
    prefills = []
    for r in np.flatnonzero(n > 1):
        length = int(start_pos[r] + n[r])
        k = np.arange(length)
        prefills.append(PrefillSpan(int(starts[r]), int(n[r]), int(start_pos[r]), to_dev(bt[r, k // bs] * bs + k % bs)))
    meta = AttentionMetadata(slot_mapping=to_dev(slots), decode_token_idx=to_dev(starts[dec]),
                             block_tables=to_dev(tables[dec].astype(np.int32)), seq_lens=to_dev(seq_lens),
                             prefills=prefills, max_decode_len=int(seq_lens.max()) if len(dec) else 0)
    return pos, meta


def kv_slots(tables: np.ndarray, rows: np.ndarray, pos: np.ndarray, block_size: int) -> np.ndarray:
    """KV slot of each token: row ``rows[i]``'s position ``pos[i]`` through its block table."""
    blocks = tables[rows, pos // block_size].astype(np.int64)
    if np.any(blocks < 0):
        raise ValueError("a token's position lies beyond its block table")
    return blocks * block_size + pos % block_size


def token_ids_of(plan: IterationPlan, rows: np.ndarray) -> np.ndarray:
    """The plan's tokens of ``rows``, concatenated in that order (one gather)."""
    n_all = plan.num_tokens.astype(np.int64)
    first = (np.cumsum(n_all) - n_all)[rows]
    n = n_all[rows]
    local_starts = np.cumsum(n) - n
    row = np.repeat(np.arange(len(rows)), n)
    return plan.token_ids[first[row] + (np.arange(int(n.sum())) - local_starts[row])]


@dataclasses.dataclass
class SubBatch:
    """One pipeline sub-batch, rows in the three parts of the module docstring.

    - ``rows``: plan row indices in this sub-batch's order; ``last_token[i]`` the flat index of row
      ``rows[i]``'s last token (its hidden state is sampled).
    - ``num_gpu``/``num_staged``/``num_cpu``: tokens of each part, in that order.
    - ``meta``/``stage_meta``: attention metadata of parts 1 and 2 (None when the part is empty).
    - ``stage_runs``: ``[n, 3]`` (staging block, host block, count) copies after each layer.
    """

    rows: np.ndarray
    input_ids: torch.Tensor
    positions: torch.Tensor
    last_token: np.ndarray
    num_gpu: int
    num_staged: int
    num_cpu: int
    meta: AttentionMetadata | None
    stage_meta: AttentionMetadata | None
    stage_runs: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.num_gpu + self.num_staged + self.num_cpu

    @property
    def cpu_slice(self) -> slice:
        return slice(self.num_gpu + self.num_staged, self.num_tokens)


def build_sub_batch(plan: IterationPlan, rows: np.ndarray, block_size: int, device: torch.device,
                    staging_blocks: int) -> SubBatch:
    """Order ``rows`` into the three parts and build each part's metadata."""
    on_cpu = plan.places[rows] == Place.CPU
    single = plan.num_tokens[rows] == 1
    parts = [rows[~on_cpu], rows[on_cpu & ~single], rows[on_cpu & single]]
    positions, metas = [], []
    stage_runs = np.zeros((0, 3), np.int32)
    for k, part in enumerate(parts[:2]):
        tables = plan.block_tables[part]
        if k == 1 and len(part):
            tables, stage_runs = _staging_tables(plan, part, block_size, staging_blocks)
        p, m = flat_batch(plan, part, tables, block_size, device)
        positions.append(p)
        metas.append(m if len(part) else None)
    cpu_rows = parts[2]
    positions.append(plan.start_pos[cpu_rows].astype(np.int64))
    order = np.concatenate(parts)
    n = plan.num_tokens[order].astype(np.int64)
    to_dev = to_device(device)
    return SubBatch(
        rows=order, input_ids=to_dev(token_ids_of(plan, order).astype(np.int64)),
        positions=to_dev(np.concatenate(positions)), last_token=np.cumsum(n) - 1,
        num_gpu=int(plan.num_tokens[parts[0]].sum()), num_staged=int(plan.num_tokens[parts[1]].sum()),
        num_cpu=len(cpu_rows), meta=metas[0], stage_meta=metas[1], stage_runs=stage_runs)


def _staging_tables(plan: IterationPlan, rows: np.ndarray, block_size: int,
                    staging_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous staging blocks per CPU-bound prefill, and their copies into its host blocks."""
    need = -(-plan.num_tokens[rows].astype(np.int64) // block_size)
    if need.sum() > staging_blocks:
        raise ValueError(f"CPU-bound prefills need {need.sum()} staging blocks; {staging_blocks} exist "
                         "(they must fit --max-num-batched-tokens)")
    if np.any(plan.start_pos[rows] != 0):
        raise ValueError("a CPU-bound prompt must be prefilled in one chunk")
    tables = np.full((len(rows), int(need.max())), -1, np.int32)
    src, dst = [], []
    first = 0
    for i, (r, m) in enumerate(zip(rows, need)):
        tables[i, :m] = np.arange(first, first + m)
        src.extend(range(first, first + m))
        dst.extend(plan.block_tables[r, :m].tolist())
        first += m
    return tables, merge_runs(src, dst)
