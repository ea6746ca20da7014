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

The host pool can hold a second tier of the cache (``enable_host_tier``): blocks the GPU pool evicts
are copied out to it instead of dropped (``take_for_copy`` / ``commit_copy``), and so are the full
blocks CPU-resident requests compute (``register``); there at most ``budget`` cached blocks that no
table holds wait in its own ``evictable`` LRU. Live allocations take them like free blocks, so the
cache never displaces a request's KV.
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
    - ``budget``: most cached blocks ``evictable`` may hold (None: the whole pool); beyond it the
      least recently used are dropped (host tier).
    - ``evicted``: (block, hash) of cached blocks allocations took since ``take_evicted``, while
      someone demotes them (None: nobody does, nothing is recorded).
    - ``held``: references taken for the iteration being scheduled only (``hold``, ``park``), given
      back by ``release_held``: blocks that a copy of this iteration reads must not be overwritten
      by another copy of the same iteration.
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
        self.budget: int | None = None
        self.evicted: list[tuple[int, bytes]] | None = None
        self.held: list[int] = []

    def enable_host_tier(self, budget: int) -> None:
        """Cache registered blocks here too, keeping at most ``budget`` of them that no table holds."""
        self.caching, self.budget = True, budget

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
            table.append(self._take())
        return table

    def _take(self) -> int:
        """A block for new KV (reference count 1): a free one, else the least recently used cached one."""
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            h = self.hash_of.pop(block)
            del self.cached[h]
            if self.evicted is not None:
                self.evicted.append((block, h))
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block]:
            return
        if block in self.hash_of:
            self.evictable[block] = None
            self._trim()
        else:
            self.free_blocks.append(block)

    def _trim(self) -> None:
        while self.budget is not None and len(self.evictable) > self.budget:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
            self.free_blocks.append(block)

    def free(self, seq_id: int) -> None:
        """Drop the sequence's table; blocks no other table holds are freed (cached ones become
        evictable, the table's tail first, so a shared prefix outlives the suffixes behind it)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self._release(block)

    # -- references held for one iteration ------------------------------------------------------
    def hold(self, blocks: list[int]) -> None:
        """Keep ``blocks`` (cached ones a copy of this iteration reads) from being taken until
        ``release_held``."""
        for block in blocks:
            self.ref_count[block] += 1
            self.evictable.pop(block, None)
        self.held.extend(blocks)

    def park(self, seq_id: int) -> None:
        """Free the sequence's table at ``release_held`` instead of now (a copy of this iteration
        still reads it)."""
        self.held.extend(reversed(self.tables.pop(seq_id, [])))

    def release_held(self) -> None:
        for block in self.held:
            self._release(block)
        self.held.clear()

    def take_evicted(self) -> list[tuple[int, bytes]]:
        """The cached blocks allocations took since the last call (their KV is intact until the
        forward of the iteration being scheduled)."""
        if not self.evicted:
            return []
        out, self.evicted = self.evicted, []
        return out

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

    def cached_block(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def count_lookup(self, queried_blocks: int, hit_blocks: int) -> None:
        """Add one admitted request's lookup to the hit statistics."""
        self.queried_tokens += queried_blocks * self.block_size
        self.hit_tokens += hit_blocks * self.block_size

    def share(self, seq_id: int, blocks: list[int | None]) -> list[int]:
        """Start the (new) sequence's table with ``blocks`` already holding its prefix's KV; a None
        is a fresh block (its KV is copied in from the other tier). The shared blocks are taken
        out of ``evictable`` before any fresh one is allocated, so none of them is evicted for it."""
        assert seq_id not in self.tables, "a prefix is shared into a new table only"
        fresh = blocks.count(None)
        for block in blocks:
            if block is not None:
                self.ref_count[block] += 1
                self.evictable.pop(block, None)
        if fresh > self.num_free:
            for block in blocks:
                if block is not None:
                    self._release(block)
            raise MemoryError(f"{self.place.name} pool: need {fresh} blocks, {self.num_free} free")
        table = self.tables[seq_id] = [self._take() if block is None else block for block in blocks]
        return table

    # -- copies into the host tier ----------------------------------------------------------------
    def take_for_copy(self, h: bytes) -> int | None:
        """A block to copy the KV named ``h`` into (reference count 1 until ``commit_copy`` or
        ``drop_copy``); None if it is cached here already (then it counts as used now) or nothing
        may be taken: no budget, or every block is some table's."""
        block = self.cached.get(h)
        if block is not None:
            if block in self.evictable:
                self.evictable.move_to_end(block)
            return None
        if not self.budget or self.num_free == 0:
            return None
        return self._take()

    def commit_copy(self, block: int, h: bytes) -> None:
        """The copy into ``block`` has run: cache it under ``h`` (unless another block holds ``h`` by now)."""
        if h not in self.cached:
            self.hash_of[block], self.cached[h] = h, block
        self._release(block)

    def drop_copy(self, block: int) -> None:
        """The copy into ``block`` never ran (its iteration failed)."""
        self._release(block)

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
