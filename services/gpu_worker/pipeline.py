"""The asymmetric two-sub-batch pipeline (docs/design.md, "The GPU worker"): GPU dense work of one sub-batch
overlaps CPU attention of the other, layer by layer.

Per layer i, two stages::

    stage A: GPU  post-attn(i-1, sb1) + pre-attn(i, sb1) + attention(i, sb0)   CPU  attention(i, sb0)
    stage B: GPU  post-attn(i, sb0) + pre-attn(i+1, sb0) + attention(i, sb1)   CPU  attention(i, sb1)

A stage first queues the copy of its CPU rows' q/k/v to the segment's staging slot (a side stream,
after the event that marks them computed), then queues all of its GPU work, and only then waits
(for the cpu_attention process), then queues the copy of o back to the GPU ahead of the
post-attention work that reads it. The doorbell rings as soon as the copy has landed: between the
launches of the stage the host polls the copy's event, so the CPU starts while the host is still
queueing GPU work (when launches, not the GPU, bound the stage, ringing only after all of them
would put CPU attention after the launch time instead of beside it). The GPU never idles on the
handoff unless the CPU is slower than the stage's GPU work (which the policy's slack inequality
prevents in ``auto`` mode). CPU-bound prefills run in sub-batch 0 over a one-layer staging area;
their KV goes to the host pool after each layer (``HostKv.stream_out``). The dense work between two
attentions of a sub-batch replays a captured CUDA graph when the sub-batch fits the captured sizes
(``stage_graphs.py``), so a stage launches one replay plus its attention. On the CPU device the same
code runs with synchronous copies; that is how CI checks it against GPU-only execution.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import numpy as np
import torch

from neo_common.protocol import IterationPlan
from neo_common.enums import CpuState
from neo_common.procs import pid_alive
from neo_common.settings import ConfigError
from neo_common.host_kernel import kernel
from neo_common.segment import job_seq
from neo_gpu_worker.attention import paged_attention
from neo_gpu_worker.ops import write_kv
from neo_gpu_worker.batch import SubBatch, build_sub_batch
from neo_gpu_worker.emulation import Emulator, PipelineStages
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.models import cpu_attention_supports
from neo_gpu_worker.models.protocol import CausalLM
from neo_gpu_worker.stage_graphs import EagerDense, StageGraphs

log = logging.getLogger(__name__)

_LOG_EVERY = 200
_POLL_S = 0.2   # doorbell waits are sliced so a dead cpu_attention process is noticed quickly
_PARTS = ("dense", "send", "stream_out")   # host time of a forward, by what it launched
# the stage clock without emulation: every call a no-op, so one serves every forward (an emulated
# forward builds its own: it prices that forward's sub-batches)
_UNEMULATED = PipelineStages(None, None, (), 0)


class Handoff:
    """Moves one sub-batch's CPU rows to the cpu_attention process and o back, per layer.

    ``cpu_wait_s`` accumulates the host's doorbell waits of the current iteration, ``copy_wait_s`` its
    waits for the GPU to produce (and copy out) rows not yet landed when needed; ``unrung`` maps
    a slot to (copy event, job) while its rows are on their way to host memory. ``serving_pid``:
    the cpu_attention process attached when the iteration began (0: none yet), which alone holds
    the iteration's plan; set by :meth:`begin`.
    """

    def __init__(self, host: HostKv, device: torch.device, timeout_s: float,
                 emulator: Emulator | None = None) -> None:
        self.host, self.device, self.timeout_s = host, device, timeout_s
        self.emulator = emulator   # paces the copies at the emulated PCIe rate (None: off)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        lay = host.segment.layout
        self.slots = [{name: host.region(name, j) for name in ("q", "k_new", "v_new", "o")}
                      for j in range(lay.num_slots)]
        self.max_rows = lay.max_rows
        self.cpu_wait_s = 0.0
        self.copy_wait_s = 0.0
        self.unrung: dict[int, tuple] = {}
        self.serving_pid = 0

    def begin(self) -> None:
        """Start an iteration: note which cpu_attention process was sent its plan."""
        self.cpu_wait_s = self.copy_wait_s = 0.0
        pid, state = self.host.segment.cpu_state()
        self.serving_pid = int(pid) if state is CpuState.ATTACHED else 0

    def send(self, slot: int, job: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue the copy of q/k/v rows into ``slot`` for doorbell value ``job``; ring it once landed."""
        rows = q.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} CPU rows in one sub-batch; the segment holds {self.max_rows}")
        dst = self.slots[slot]
        emu = self.emulator
        nbytes = sum(t.numel() for t in (q, k, v)) * self.host.dtype.itemsize
        if self.side is None:
            if emu:
                emu.side.begin()
            for name, src in (("q", q), ("k_new", k), ("v_new", v)):
                dst[name][:rows].copy_(src)
            if emu:
                emu.side.copy(nbytes)
            self.host.segment.ring(slot, job)
            return
        dtype = self.host.dtype
        srcs = [t.to(dtype) for t in (q, k, v)]
        ready = torch.cuda.Event()
        ready.record()
        self.side.wait_event(ready)
        with torch.cuda.stream(self.side):
            if emu:
                emu.side.begin()
            for name, src in zip(("q", "k_new", "v_new"), srcs):
                dst[name][:rows].copy_(src, non_blocking=True)
                src.record_stream(self.side)
            if emu:
                emu.side.copy(nbytes)
            copied = torch.cuda.Event()
            copied.record(self.side)
        self.unrung[slot] = (copied, job)
        self.poll()

    def poll(self) -> None:
        """Ring every slot whose rows have landed in host memory (never blocks)."""
        for slot, (copied, job) in list(self.unrung.items()):
            if copied.query():
                self.host.segment.ring(slot, job)
                del self.unrung[slot]

    def finish(self, slot: int, iteration_id: int, layer: int, out: torch.Tensor) -> None:
        """Ring the doorbell if :meth:`poll` has not yet, wait for o, queue its copy into ``out``."""
        if slot in self.unrung:
            copied, job = self.unrung.pop(slot)
            t_copy = time.perf_counter()
            copied.synchronize()
            self.copy_wait_s += time.perf_counter() - t_copy
            self.host.segment.ring(slot, job)
        seg = self.host.segment
        seq = job_seq(iteration_id, layer)
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        while True:
            try:
                status = seg.wait_done(slot, seq, timeout_s=_POLL_S)
                break
            except TimeoutError:
                pid, state = seg.cpu_state()   # DETACHED: no process attached yet (it may be starting)
                if state is CpuState.EXITED or (state is CpuState.ATTACHED and not pid_alive(int(pid))):
                    raise RuntimeError("the cpu_attention process is gone (it served this segment as pid "
                                       f"{pid})") from None
                if state is CpuState.ATTACHED and self.serving_pid and pid != self.serving_pid:
                    # A restarted process attached mid-iteration: this iteration's plan went to the one
                    # that died, so nobody will ever answer this doorbell.
                    raise RuntimeError(f"the cpu_attention process was replaced during iteration {iteration_id} "
                                       f"(pid {self.serving_pid} -> {pid})") from None
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"cpu attention of layer {layer} not done after {self.timeout_s:.0f}s") \
                        from None
        self.cpu_wait_s += time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"cpu attention of layer {layer} failed: {kernel.describe(status)}")
        if self.emulator:
            self.emulator.main.begin()
        out.copy_(self.slots[slot]["o"][:out.shape[0]], non_blocking=True)
        if self.emulator:
            self.emulator.main.copy(out.numel() * out.element_size())

    def synchronize(self) -> None:
        self.unrung.clear()
        if self.side is not None:
            self.side.synchronize()


class PipelinedExecutor:
    """Runs a plan with CPU-resident rows: both sub-batches through every layer, as above.

    - ``staging``: the one-layer GPU KV area CPU-bound prefills attend over, ``[2, blocks, bs, H, D]``.
    - ``handoff``: the per-layer CPU handoff (its ``cpu_wait_s`` is reset every iteration).
    - ``graphs``: captured dense boundaries (None: every iteration runs them eagerly); iterations
      whose sub-batches outgrow its buckets run eagerly too. ``graphed``: whether the last did.
    - ``spent``: the current iteration's host seconds per part (``_PARTS``); ``totals`` sums
      iterations since the last log line.
    - ``emulator``: GPU emulation (None: off). Each stage's GPU work is bracketed by its compute
      clock: the dense step of one sub-batch plus the GPU-attended rows of the other.
    """

    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, host: HostKv, block_size: int,
                 staging_blocks: int, device: torch.device, timeout_s: float,
                 graphs: StageGraphs | None = None, emulator: Emulator | None = None) -> None:
        g = model.geometry
        if not cpu_attention_supports(g):
            raise ConfigError(f"--model {g.name!r} ({g.architecture}): its attention soft-capping or scale is not "
                              "in the cpu_attention kernel; serve it without offloading (--offload-mode off)")
        self.graphs = graphs
        self.model, self.kv_cache, self.host = model, kv_cache, host
        self.block_size, self.device = block_size, device
        self.staging = torch.zeros((2, staging_blocks, block_size, g.num_kv_heads, g.head_dim),
                                   dtype=kv_cache.dtype, device=device)
        self.handoff = Handoff(host, device, timeout_s, emulator)
        self._kept: tuple[list, list[SubBatch]] | None = None   # see take_hidden
        self.emulator = emulator
        self.spent = dict.fromkeys(_PARTS, 0.0)   # this iteration's host seconds per part (see _account)
        self.graphed = False
        self.totals = dict.fromkeys(("iterations", "graphed", "host", "copy", "cpu", *_PARTS), 0.0)

    def forward(self, plan: IterationPlan) -> tuple[torch.Tensor, np.ndarray]:
        """Final hidden states of every row's last token, and the plan rows they belong to."""
        self.handoff.begin()
        self.spent = dict.fromkeys(_PARTS, 0.0)
        t0 = time.perf_counter()
        self.plan = plan
        sbs = [build_sub_batch(plan, np.flatnonzero(plan.sub_batch == j), self.block_size, self.device,
                               self.staging.shape[1]) for j in (0, 1)]
        try:
            hidden = self._layers(plan.iteration_id, sbs)
        except BaseException:
            self.host.segment.abort(plan.iteration_id)   # the cpu side stops waiting for this iteration
            raise
        finally:
            self.handoff.synchronize()
        last = [h[torch.from_numpy(sb.last_token).to(self.device)] for h, sb in zip(hidden, sbs) if sb.num_tokens]
        self._kept = (hidden, sbs) if len(plan.plp_rows) else None   # prompt logprobs read every position
        rows = np.concatenate([sb.rows for sb in sbs if sb.num_tokens])
        self._account(time.perf_counter() - t0)
        return torch.cat(last), rows

    def take_hidden(self) -> tuple[list, list[SubBatch]] | None:
        """Every token's hidden states of the last forward, per sub-batch, and the sub-batches (kept
        only when its plan asked for prompt logprobs); forgotten once taken."""
        kept, self._kept = self._kept, None
        return kept

    def _account(self, host_s: float) -> None:
        """Log, every ``_LOG_EVERY`` iterations, where the host's time went: a forward bounded by the
        GPU shows as copy waits, one bounded by the CPU as CPU waits; the rest is launching, split
        into the dense work (graph replays or eager kernels), the q/k/v sends, the KV stream-out of
        CPU-bound prefills, and attention with everything else."""
        total = self.totals
        for key, value in (("iterations", 1), ("graphed", self.graphed), ("host", host_s),
                           ("copy", self.handoff.copy_wait_s), ("cpu", self.handoff.cpu_wait_s), *self.spent.items()):
            total[key] += value
        if total["iterations"] < _LOG_EVERY:
            return
        n = total["iterations"]
        ms = {k: v / n * 1e3 for k, v in total.items()}
        rest = ms["host"] - ms["copy"] - ms["cpu"] - sum(ms[p] for p in _PARTS)
        log.info("pipelined forward, mean of %d (%d from stage graphs): host %.2f ms = waiting on GPU copies "
                 "%.2f ms + on CPU attention %.2f ms + launching: dense %.2f ms, sends %.2f ms, KV stream-out "
                 "%.2f ms, attention and the rest %.2f ms", n, total["graphed"], ms["host"], ms["copy"], ms["cpu"],
                 ms["dense"], ms["send"], ms["stream_out"], rest)
        self.totals = dict.fromkeys(total, 0.0)

    def _layers(self, it: int, sbs: list[SubBatch]) -> list[torch.Tensor]:
        layers = len(self.model.layers)
        self.graphed = self.graphs is not None and self.graphs.fits(sbs)
        dense = self.graphs if self.graphed else EagerDense(self.model)
        dense.begin(sbs)
        live = [sb.num_tokens > 0 for sb in sbs]
        poll = self.handoff.poll
        clock = _UNEMULATED if self.emulator is None else PipelineStages(self.emulator, self.plan, sbs, layers)

        def step(j: int, i: int) -> None:
            with self._spending("dense"):
                dense.step(j, i)

        if live[0]:
            clock.begin()
            step(0, 0)
            clock.end(dense=(0, 0))
        for i in range(layers):
            # stage A: attention of sub-batch 0 (CPU rows on the CPU), dense work of sub-batch 1
            clock.begin()
            if live[0]:
                self._send(0, it, i, sbs[0], dense.qkv[0])
            if live[1]:
                step(1, i)
                poll()
            if live[0]:
                out = self._attention(0, i, sbs[0], dense)
            clock.end(dense=(1, i) if live[1] else None, attention=0 if live[0] else None)
            if live[0]:
                self._receive(0, it, i, sbs[0], out)
            # stage B: attention of sub-batch 1, dense work of sub-batch 0
            clock.begin()
            if live[1]:
                self._send(1, it, i, sbs[1], dense.qkv[1])
            if live[0]:
                step(0, i + 1)
                poll()
            if live[1]:
                out = self._attention(1, i, sbs[1], dense)
            clock.end(dense=(0, i + 1) if live[0] else None, attention=1 if live[1] else None)
            if live[1]:
                self._receive(1, it, i, sbs[1], out)
        if live[1]:
            clock.begin()
            step(1, layers)
            clock.end(dense=(1, layers))
        return [dense.hidden(j) if live[j] else None for j in (0, 1)]

    @contextlib.contextmanager
    def _spending(self, part: str) -> Iterator[None]:
        """Add the host time of the block to this iteration's ``part`` (see ``_account``)."""
        t = time.perf_counter()
        yield
        self.spent[part] += time.perf_counter() - t

    def _send(self, slot: int, it: int, layer: int, sb: SubBatch, qkv) -> None:
        if sb.num_cpu:
            q, k, v = qkv
            c = sb.cpu_slice
            with self._spending("send"):
                self.handoff.send(slot, job_seq(it, layer), q[c], k[c], v[c])

    def _attention(self, j: int, i: int, sb: SubBatch, dense: EagerDense | StageGraphs) -> torch.Tensor:
        """Attention of layer ``i`` for sub-batch ``j`` into ``dense.attn_out(j)``, which it returns:
        the GPU-pool rows and CPU-bound prefills here (the CPU decodes' o comes with
        :meth:`_receive`, into the same tensor: ``EagerDense.attn_out`` allocates a new one per call)."""
        q, k, v = dense.qkv[j]
        out = dense.attn_out(j)
        scale = self.model.layers[i].attn_scale   # the cpu_attention process applies the same (see __init__)
        if sb.meta is not None:
            g = slice(0, sb.num_gpu)
            write_kv(self.kv_cache[i], sb.meta.slot_mapping, k[g], v[g])
            paged_attention(q[g], self.kv_cache[i], sb.meta, scale, out=out[g])
        if sb.stage_meta is not None:
            s = slice(sb.num_gpu, sb.num_gpu + sb.num_staged)
            write_kv(self.staging, sb.stage_meta.slot_mapping, k[s], v[s])
            paged_attention(q[s], self.staging, sb.stage_meta, scale, out=out[s])
            with self._spending("stream_out"):
                self.host.stream_out(i, self.staging, sb.stage_runs, self.handoff.side)
        return out

    def _receive(self, j: int, it: int, i: int, sb: SubBatch, out: torch.Tensor) -> None:
        """The CPU decodes' o of layer ``i`` for sub-batch ``j``, from the cpu_attention process, into
        ``out`` (the tensor :meth:`_attention` filled)."""
        if sb.num_cpu:
            self.handoff.finish(j, it, i, out[sb.cpu_slice])
