"""The host tier of the prefix cache: GPU blocks the GPU pool evicts are demoted to the host pool
instead of dropped, and prompts find them there (docs/design.md, "Prefix caching").

Copies ride the iteration's swaps (``SchedulerOutput.swap_out_pairs`` / ``swap_in_pairs``), which
the worker runs before the forward, swap-outs first. That order decides what may share an
iteration: a GPU block evicted by an allocation is read by its demotion before the forward (or a
swap-in) overwrites it; a host block read by a swap-in this iteration must not be the destination of
a demotion of the same iteration, so such blocks are held (``BlockManager.hold``/``park``) until the
iteration's demotions are chosen (``flush``, the last step of scheduling). A demoted block is
cached in the host tier only once its iteration has run (``confirm``, from ``Scheduler.update``):
an iteration that fails leaves no block whose KV was never copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager

if TYPE_CHECKING:
    from neo_gateway.schedule_output import SchedulerOutput


class HostTier:
    """Demotion and promotion bookkeeping between the GPU pool ``gpu`` and the host pool ``cpu``.

    - ``demoting``: iteration id -> (host block, hash) copies it carries, cached once it has run.
    - ``num_demoted_blocks`` / ``num_promoted_blocks``: blocks copied GPU -> host / host -> GPU for
      the cache, since start (``block_bytes`` each, when the tables gave the geometry; else 0).
    """

    def __init__(self, gpu: BlockManager, cpu: BlockManager, budget: int, block_bytes: int = 0) -> None:
        self.gpu, self.cpu = gpu, cpu
        cpu.enable_host_tier(budget)
        gpu.evicted = []
        self.demoting: dict[int, list[tuple[int, bytes]]] = {}
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
        """Demote the cached GPU blocks this iteration's allocations evicted (copy-out before its
        forward), then let go of the host blocks held while it was scheduled."""
        pairs = []
        for gpu_block, h in self.gpu.take_evicted():
            host_block = self.cpu.take_for_copy(h)
            if host_block is not None:
                pairs.append((gpu_block, host_block, h))
        if pairs:
            out.swap_out_pairs.append(([p[0] for p in pairs], [p[1] for p in pairs]))
            self.demoting[out.iteration_id] = [(p[1], p[2]) for p in pairs]
            self.num_demoted_blocks += len(pairs)
        self.cpu.release_held()

    def confirm(self, iteration_id: int) -> None:
        """Iteration ``iteration_id`` ran: its demoted blocks join the host tier. Earlier ones
        still pending never ran (failed): their blocks go back unfilled."""
        for it in [i for i in self.demoting if i <= iteration_id]:
            for block, h in self.demoting.pop(it):
                if it == iteration_id:
                    self.cpu.commit_copy(block, h)
                else:
                    self.cpu.drop_copy(block)

    @property
    def num_pending(self) -> int:
        """Host blocks reserved by demotions whose iteration has not reported yet."""
        return sum(len(v) for v in self.demoting.values())
