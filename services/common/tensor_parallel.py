"""How a model is split over tensor-parallel ranks (no torch: the worker, the CPU attention service
and the operator all use it).

Megatron-style: rank r holds a contiguous range of KV heads with their query heads (the attention
of a head never needs another rank), the matching slice of the O-projection's input columns, and a
slice of the MLP's intermediate units (gate/up rows, down columns); after the O-projection and after
the MLP the ranks' partial sums are all-reduced. Norms, the embedding and the LM head are
replicated. Ranges are as even as possible and need not be equal: a model with 3 KV heads on
2 ranks gives 2 heads to rank 0 and 1 to rank 1 (the all-reduced outputs have the full hidden size on
every rank either way), so a rank count need not divide the head count, only not exceed it.

Each rank's KV cache, host KV pool and CPU attention process hold only its own KV heads, so the
block tables (and the gateway's block managers) are the same for every rank.
"""

from __future__ import annotations

import dataclasses

from neo_common.geometry import ModelGeometry


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous ranges over ``range(total)``, sizes differing by at
    most one, the larger ones first."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclasses.dataclass(frozen=True)
class Shard:
    """What one rank holds of a model.

    - ``rank``/``world``: this rank and the rank count (``world == 1``: the whole model).
    - ``kv_heads``/``q_heads``: [start, end) ranges of KV and query heads.
    - ``intermediate``: [start, end) range of MLP intermediate units.
    """

    rank: int
    world: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    intermediate: tuple[int, int]

    @classmethod
    def of(cls, g: ModelGeometry, rank: int = 0, world: int = 1) -> "Shard":
        check(g, world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        group = g.num_heads // g.num_kv_heads
        kv = split_evenly(g.num_kv_heads, world, rank)
        return cls(rank, world, kv, (kv[0] * group, kv[1] * group),
                   split_evenly(g.intermediate_size, world, rank))

    def local_geometry(self, g: ModelGeometry) -> ModelGeometry:
        """The geometry of this rank's layers (heads and MLP width of its shard; the rest whole)."""
        if self.world == 1:
            return g
        return dataclasses.replace(
            g, name=f"{g.name}-tp{self.world}r{self.rank}", num_heads=self.q_heads[1] - self.q_heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0])

    def rows(self, kind: str, head_dim: int) -> tuple[int, int] | None:
        """Which [start, end) slice of a full HF tensor of ``kind`` this rank holds, along the axis
        ``axis(kind)``; None for a replicated tensor."""
        if self.world == 1:
            return None
        if kind == "q_proj" or kind == "o_proj":
            return self.q_heads[0] * head_dim, self.q_heads[1] * head_dim
        if kind in ("k_proj", "v_proj"):
            return self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim
        if kind in ("gate_proj", "up_proj", "down_proj"):
            return self.intermediate
        return None

    @staticmethod
    def axis(kind: str) -> int:
        """Row-parallel layers (their input is split) slice columns; the others slice rows."""
        return 1 if kind in ("o_proj", "down_proj") else 0


def check(g: ModelGeometry, world: int) -> None:
    """Refuse a rank count the model cannot be split over, saying what would work."""
    if world < 1:
        raise ValueError(f"{world} ranks: at least 1 is needed")
    if world > g.num_kv_heads:
        raise ValueError(f"{world} ranks exceed the {g.num_kv_heads} KV heads of {g.name}: every rank needs at "
                         f"least one KV head (use at most {g.num_kv_heads})")


def rank_address(addr: str, rank: int) -> str:
    """The ZeroMQ address of rank ``rank``'s peer when ``addr`` is rank 0's: the TCP port plus the
    rank (``ipc://`` paths get a ``-tpN`` suffix)."""
    if rank == 0:
        return addr
    if addr.startswith("ipc://"):
        return f"{addr}-tp{rank}"
    host, port = addr.rsplit(":", 1)
    return f"{host}:{int(port) + rank}"
