"""The host tier of the prefix cache: GPU blocks the GPU pool evicts are demoted to the host pool
instead of dropped, and prompts find them there (docs/design.md, "Prefix caching").

Demotion happens mostly *ahead* of eviction: each iteration, the cached GPU blocks that the next
allocations would take first (the LRU end of the GPU pool's ``evictable``, as many as ``lookahead``
allocations could need beyond the free blocks) and that the host tier lacks are copied to host
blocks through the plan's ``demote`` runs, which the worker runs beside the forward on a side
stream (no row of the plan touches them: they are in no table) and which the next plan's work waits
for. When such a block is evicted later its KV is in the host tier already, so the eviction needs
no copy. A cached block evicted before it was copied ahead (an allocation burst beyond
``lookahead``) is demoted at eviction instead, through ``swap_out`` runs, which the worker runs
before the forward (swap-outs first, then swap-ins) so the copy reads the KV before the new owner
overwrites it. That order decides what may share an iteration: a host block read by a swap-in this
iteration must not be the destination of a demotion of the same iteration, so such blocks are held
(``BlockManager.hold``/``park``) until the iteration's demotions are chosen (``flush``, the last
step of scheduling). A demoted block is cached in the host tier only once its iteration has run
(``confirm``, from ``Scheduler.update``): an iteration that fails leaves no block whose KV was never
copied.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager

if TYPE_CHECKING:
    from neo_gateway.schedule_output import SchedulerOutput


class HostTier:
    """Demotion and promotion bookkeeping between the GPU pool ``gpu`` and the host pool ``cpu``.

    - ``demoting``: iteration id -> (host block, hash) copies it carries, cached once it has run;
      ``copying`` the hashes of all of them (a block whose copy is under way needs no other).
    - ``lookahead``: blocks the next allocations may take (the engine's token budget of two
      iterations, in blocks): the GPU blocks they would evict are copied ahead, at most half of
      them per iteration.
    - ``num_demoted_blocks`` / ``num_promoted_blocks``: blocks copied GPU -> host / host -> GPU for
      the cache, since start (``block_bytes`` each, when the tables gave the geometry; else 0).
    """

    def __init__(self, gpu: BlockManager, cpu: BlockManager, budget: int, block_bytes: int = 0,
                 lookahead: int = 0) -> None:
        self.gpu, self.cpu = gpu, cpu
        cpu.enable_host_tier(budget)
        gpu.evicted = []
        self.lookahead = lookahead
        self.demoting: dict[int, list[tuple[int, bytes]]] = {}
        self.copying: set[bytes] = set()
        self.num_demoted_blocks = 0
        self.num_promoted_blocks = 0
        self.block_bytes = block_bytes

    def lookup(self, hashes: list[bytes]) -> list[tuple[Place, int]]:
        """The longest cached prefix of ``hashes``, each block where it is (the GPU preferred)."""
        out = []
        for h in hashes:
            block = self.gpu.cached_block(h)
            if block is not None:
                out.append((Place.GPU, block))
                continue
            block = self.cpu.cached_block(h)
            if block is None:
                break
            out.append((Place.CPU, block))
        return out

    def host_prefix(self, hashes: list[bytes]) -> list[int]:
        """The longest prefix of ``hashes`` cached in the host pool (what a CPU-resident table can use)."""
        return self.cpu.cached_prefix(hashes)

    def promote(self, out: "SchedulerOutput", host_blocks: list[int], gpu_blocks: list[int]) -> None:
        """Copy ``host_blocks`` into ``gpu_blocks`` before this iteration's forward."""
        self.cpu.hold(host_blocks)
        out.swap_in_pairs.append((list(host_blocks), list(gpu_blocks)))
        self.num_promoted_blocks += len(host_blocks)

    def flush(self, out: "SchedulerOutput") -> None:
        """Demote the cached GPU blocks this iteration's allocations evicted uncopied (before its
        forward) and copy ahead those the next ones would evict (beside it), then let go of the
        host blocks held while it was scheduled."""
        evicted = self._demotions(self.gpu.take_evicted())
        ahead = self._copies_ahead() if out.rows else []
        for pairs, runs in ((evicted, out.swap_out_pairs), (ahead, out.demote_pairs)):
            if pairs:
                runs.append(([p[0] for p in pairs], [p[1] for p in pairs]))
        if evicted or ahead:
            self.demoting[out.iteration_id] = [(p[1], p[2]) for p in evicted + ahead]
            self.copying.update(p[2] for p in evicted + ahead)
            self.num_demoted_blocks += len(evicted) + len(ahead)
        self.cpu.release_held()

    def _demotions(self, evicted: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
        """(GPU block, host block, hash) for each evicted cached block whose KV the host tier lacks
        and is not being copied, while host blocks can be taken; one the tier holds counts as used
        now (it was in use on the GPU until now)."""
        pairs = []
        for gpu_block, h in evicted:
            if h in self.copying:
                continue
            host_block = self.cpu.take_for_copy(h)   # None: the tier holds h (now its most recent) or has no room
            if host_block is not None:
                pairs.append((gpu_block, host_block, h))
            elif self.cpu.cached_block(h) is None:
                break
        return pairs

    def _copies_ahead(self) -> list[tuple[int, int, bytes]]:
        """(GPU block, host block, hash) for the cached GPU blocks the next ``lookahead``
        allocations would evict (oldest first) whose KV the host tier lacks and is not being
        copied: at most half the lookahead (one iteration's share, so that no plan waits long for
        them), while ``_room_ahead``."""
        pairs = []
        room = self.lookahead - len(self.gpu.free_blocks)
        for gpu_block in itertools.islice(self.gpu.evictable, max(0, room)):
            if len(pairs) >= self.lookahead // 2:
                break
            h = self.gpu.hash_of[gpu_block]
            if h in self.copying or self.cpu.cached_block(h) is not None:
                continue
            host_block = self.cpu.take_for_copy(h) if self._room_ahead() else None
            if host_block is None:
                break
            pairs.append((gpu_block, host_block, h))
        return pairs

    def _room_ahead(self) -> bool:
        """Whether a copy ahead may take a host block: a free one while the tier is under its
        budget, else the room of the tier's least recently used entry if that is not a copy ahead
        itself (its KV still cached on the GPU).
        A tier smaller than the lookahead would otherwise evict one copy ahead for the next and
        copy the same blocks again every iteration."""
        if self.cpu.free_blocks and len(self.cpu.evictable) + self.num_pending < (self.cpu.budget or 0):
            return True
        victim = next(iter(self.cpu.evictable), None)
        return victim is not None and self.gpu.cached_block(self.cpu.hash_of[victim]) is None

    def confirm(self, iteration_id: int) -> None:
        """Iteration ``iteration_id`` ran: its demoted blocks join the host tier. Earlier ones
        still pending never ran (failed): their blocks go back unfilled."""
        for it in [i for i in self.demoting if i <= iteration_id]:
            for block, h in self.demoting.pop(it):
                self.copying.discard(h)
                if it == iteration_id:
                    self.cpu.commit_copy(block, h)
                else:
                    self.cpu.drop_copy(block)

    @property
    def num_pending(self) -> int:
        """Host blocks reserved by demotions whose iteration has not reported yet."""
        return sum(len(v) for v in self.demoting.values())
