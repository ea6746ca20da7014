"""Paged KV block accounting for one pool (the GPU pool, or the host pool for CPU-resident requests).

The gateway owns block ids; workers only read block tables. A request's blocks always cover
``ceil(num_tokens / block_size)`` of its tokens in one pool.

With prefix caching (docs/design.md, "Prefix caching") a full block whose KV is computed is
registered under its hash (``neo_gateway.prefix_hash``); another request whose prompt starts with
the same blocks takes them into its table instead of computing them again, so a block may appear in
several tables (``ref_count``). A block nobody references any more keeps its KV and its hash and
waits in ``evictable``, least recently freed first, until an allocation needs it: free blocks
without KV are always taken before it. Only full blocks are shared; a request's partial last block
is its own, since its KV grows in place.
"""

from __future__ import annotations

import collections

from neo_common.protocol import Place


class BlockManager:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens.

    - ``free_blocks``: ids without KV worth keeping, reused LIFO (recently freed blocks are warm).
    - ``tables``: seq_id -> its block ids in position order; grows with the sequence, dropped on free.
    - ``ref_count``: block id -> tables holding it (0 for free and evictable blocks).
    - ``cached``: block hash -> block id, for every block whose KV is registered under a hash;
      ``hash_of`` the reverse. ``evictable``: cached blocks no table holds, oldest first.
    - ``queried_tokens`` / ``hit_tokens``: prompt tokens looked up in the cache and found there.
    """

    def __init__(self, num_blocks: int, block_size: int, place: Place = Place.GPU, caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.place = place
        self.caching = caching
        self.free_blocks: collections.deque[int] = collections.deque(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.ref_count = [0] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, seq_id: int, num_tokens: int) -> int:
        """Blocks a sequence still needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_allocate(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_missing(seq_id, num_tokens) + reserve <= self.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow (or create) the sequence's table to cover ``num_tokens``; returns the table."""
        missing = self.num_missing(seq_id, num_tokens)
        if missing > self.num_free:
            raise MemoryError(f"{self.place.name} pool: need {missing} blocks, {self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(missing):
            block = self._take()
            self.ref_count[block] = 1
            table.append(block)
        return table

    def _take(self) -> int:
        if self.free_blocks:
            return self.free_blocks.pop()
        block, _ = self.evictable.popitem(last=False)   # the least recently freed cached block
        del self.cached[self.hash_of.pop(block)]
        return block

    def free(self, seq_id: int) -> None:
        """Drop the sequence's table; blocks no other table holds are freed (cached ones become
        evictable, the table's tail first, so a shared prefix outlives the suffixes behind it)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.ref_count[block] -= 1
            if self.ref_count[block]:
                continue
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    # -- prefix caching -----------------------------------------------------------------------
    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes``."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count_lookup(self, queried_blocks: int, hit_blocks: int) -> None:
        """Add one admitted request's lookup to the hit statistics."""
        self.queried_tokens += queried_blocks * self.block_size
        self.hit_tokens += hit_blocks * self.block_size

    def share(self, seq_id: int, blocks: list[int]) -> None:
        """Start the (new) sequence's table with ``blocks`` already holding its prefix's KV."""
        assert seq_id not in self.tables, "a prefix is shared into a new table only"
        for block in blocks:
            self.ref_count[block] += 1
            self.evictable.pop(block, None)
        self.tables[seq_id] = list(blocks)

    def register(self, seq_id: int, hashes: list[bytes], start: int = 0) -> None:
        """Record that blocks ``start .. len(hashes)`` of the sequence hold the KV those hashes name
        (their tokens are computed), so later prompts can share them. A hash already cached under
        another block keeps that block (two requests computed the same prefix at once)."""
        if not self.caching:
            return
        table = self.tables[seq_id]
        for i in range(start, min(len(hashes), len(table))):
            block, h = table[i], hashes[i]
            if block not in self.hash_of and h not in self.cached:
                self.hash_of[block] = h
                self.cached[h] = block

    def table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks
