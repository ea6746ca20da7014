"""Paged KV block accounting for one pool (the GPU pool, or the host pool for CPU-resident requests).

The gateway owns block ids; workers only read block tables. A request's blocks always cover
``ceil(num_tokens / block_size)`` of its tokens in one pool.
"""

from __future__ import annotations

import collections

from neo_common.protocol import Place


class BlockManager:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens.

    - ``free_blocks``: ids available, reused LIFO (recently freed blocks are warm in caches).
    - ``tables``: seq_id -> its block ids in position order; grows with the sequence, dropped on free.
    """

    def __init__(self, num_blocks: int, block_size: int, place: Place = Place.GPU) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.place = place
        self.free_blocks: collections.deque[int] = collections.deque(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, seq_id: int, num_tokens: int) -> int:
        """Blocks a sequence still needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_allocate(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_missing(seq_id, num_tokens) + reserve <= len(self.free_blocks)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow (or create) the sequence's table to cover ``num_tokens``; returns the table."""
        missing = self.num_missing(seq_id, num_tokens)
        if missing > len(self.free_blocks):
            raise MemoryError(f"{self.place.name} pool: need {missing} blocks, {len(self.free_blocks)} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(missing):
            table.append(self.free_blocks.pop())
        return table

    def free(self, seq_id: int) -> None:
        for block in reversed(self.tables.pop(seq_id, [])):
            self.free_blocks.append(block)

    def table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks
