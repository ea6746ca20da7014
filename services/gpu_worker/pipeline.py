"""The asymmetric two-sub-batch pipeline (DESIGN.md section 3): GPU dense work of one sub-batch
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
their KV goes to the host pool after each layer (``HostKv.stream_out``). On the CPU device the same
code runs with synchronous copies; that is how CI checks it against GPU-only execution.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from neo_common.protocol import IterationPlan
from neo_common.procs import pid_alive
from neo_cpu_attention import kernel
from neo_cpu_attention.segment import job_seq
from neo_gpu_worker.attention import paged_attention, write_kv
from neo_gpu_worker.batch import SubBatch, build_sub_batch
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.model import LlamaModel

log = logging.getLogger(__name__)

_LOG_EVERY = 200
_POLL_S = 0.2   # doorbell waits are sliced so a dead cpu_attention process is noticed quickly


class Handoff:
    """Moves one sub-batch's CPU rows to the cpu_attention process and o back, per layer.

    ``cpu_wait_s`` accumulates the host's doorbell waits of the current iteration, ``copy_wait_s`` its
    waits for the GPU to produce (and copy out) rows not yet landed when needed; ``unrung`` maps
    a slot to (copy event, job) while its rows are on their way to host memory.
    """

    def __init__(self, host: HostKv, device: torch.device, timeout_s: float) -> None:
        self.host, self.device, self.timeout_s = host, device, timeout_s
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        lay = host.segment.layout
        self.slots = [{name: host.region(name, j) for name in ("q", "k_new", "v_new", "o")}
                      for j in range(lay.num_slots)]
        self.max_rows = lay.max_rows
        self.cpu_wait_s = 0.0
        self.copy_wait_s = 0.0
        self.unrung: dict[int, tuple] = {}

    def send(self, slot: int, job: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue the copy of q/k/v rows into ``slot`` for doorbell value ``job``; ring it once landed."""
        rows = q.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} CPU rows in one sub-batch; the segment holds {self.max_rows}")
        dst = self.slots[slot]
        if self.side is None:
            for name, src in (("q", q), ("k_new", k), ("v_new", v)):
                dst[name][:rows].copy_(src)
            self.host.segment.ring(slot, job)
            return
        dtype = self.host.dtype
        srcs = [t.to(dtype) for t in (q, k, v)]
        ready = torch.cuda.Event()
        ready.record()
        self.side.wait_event(ready)
        with torch.cuda.stream(self.side):
            for name, src in zip(("q", "k_new", "v_new"), srcs):
                dst[name][:rows].copy_(src, non_blocking=True)
                src.record_stream(self.side)
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
                pid, state = seg.cpu_state()   # state 0: no process attached yet (it may be starting)
                if state == 2 or (state == 1 and not pid_alive(int(pid))):
                    raise RuntimeError("the cpu_attention process is gone (it served this segment as pid "
                                       f"{pid})") from None
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"cpu attention of layer {layer} not done after {self.timeout_s:.0f}s") \
                        from None
        self.cpu_wait_s += time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"cpu attention of layer {layer} failed: {kernel.describe(status)}")
        out.copy_(self.slots[slot]["o"][:out.shape[0]], non_blocking=True)

    def synchronize(self) -> None:
        self.unrung.clear()
        if self.side is not None:
            self.side.synchronize()


class PipelinedExecutor:
    """Runs a plan with CPU-resident rows: both sub-batches through every layer, as above.

    - ``staging``: the one-layer GPU KV area CPU-bound prefills attend over, ``[2, blocks, bs, H, D]``.
    - ``handoff``: the per-layer CPU handoff (its ``cpu_wait_s`` is reset every iteration).
    """

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, host: HostKv, block_size: int,
                 staging_blocks: int, device: torch.device, timeout_s: float) -> None:
        g = model.geometry
        self.model, self.kv_cache, self.host = model, kv_cache, host
        self.block_size, self.device = block_size, device
        self.staging = torch.zeros((2, staging_blocks, block_size, g.num_kv_heads, g.head_dim),
                                   dtype=kv_cache.dtype, device=device)
        self.handoff = Handoff(host, device, timeout_s)
        self.totals = [0, 0.0, 0.0, 0.0]   # iterations, host s, copy-wait s, cpu-wait s (see _account)

    def forward(self, plan: IterationPlan) -> tuple[torch.Tensor, np.ndarray]:
        """Final hidden states of every row's last token, and the plan rows they belong to."""
        self.handoff.cpu_wait_s = self.handoff.copy_wait_s = 0.0
        t0 = time.perf_counter()
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
        rows = np.concatenate([sb.rows for sb in sbs if sb.num_tokens])
        self._account(time.perf_counter() - t0)
        return torch.cat(last), rows

    def _account(self, host_s: float) -> None:
        """Log, every ``_LOG_EVERY`` iterations, where the host's time went: a forward bounded by the
        GPU shows as copy waits, one bounded by the CPU as CPU waits, the rest is launching."""
        total = self.totals
        total[0] += 1
        total[1] += host_s
        total[2] += self.handoff.copy_wait_s
        total[3] += self.handoff.cpu_wait_s
        if total[0] == _LOG_EVERY:
            n, host, copy, cpu = total
            log.info("pipelined forward, mean of %d: host %.2f ms = waiting on GPU copies %.2f ms + on CPU "
                     "attention %.2f ms + launching %.2f ms", n, host / n * 1e3, copy / n * 1e3, cpu / n * 1e3,
                     (host - copy - cpu) / n * 1e3)
            self.totals = [0, 0.0, 0.0, 0.0]

    def _layers(self, it: int, sbs: list[SubBatch]) -> list[torch.Tensor]:
        model, rope = self.model, self.model.rope
        layers = model.layers
        x = [model.embed_tokens(sb.input_ids) for sb in sbs]
        live = [sb.num_tokens > 0 for sb in sbs]
        qkv: list = [None, None]
        attn: list = [None, None]
        if live[0]:
            qkv[0] = layers[0].pre_attn(x[0], sbs[0].positions, rope)
        poll = self.handoff.poll
        for i in range(len(layers)):
            # stage A: attention of sub-batch 0 (CPU rows on the CPU), dense work of sub-batch 1
            if live[0]:
                self._send(0, it, i, sbs[0], qkv[0])
            if live[1]:
                if i > 0:
                    x[1] = layers[i - 1].post_attn(x[1], attn[1])
                    poll()
                qkv[1] = layers[i].pre_attn(x[1], sbs[1].positions, rope)
                poll()
            if live[0]:
                attn[0] = self._gpu_attention(i, sbs[0], qkv[0])
                self._finish(0, it, i, sbs[0], attn[0])
            # stage B: attention of sub-batch 1, dense work of sub-batch 0
            if live[1]:
                self._send(1, it, i, sbs[1], qkv[1])
            if live[0]:
                x[0] = layers[i].post_attn(x[0], attn[0])
                poll()
                if i + 1 < len(layers):
                    qkv[0] = layers[i + 1].pre_attn(x[0], sbs[0].positions, rope)
                    poll()
            if live[1]:
                attn[1] = self._gpu_attention(i, sbs[1], qkv[1])
                self._finish(1, it, i, sbs[1], attn[1])
        if live[1]:
            x[1] = layers[-1].post_attn(x[1], attn[1])
        return [model.norm(xi) for xi in x]

    def _send(self, slot: int, it: int, layer: int, sb: SubBatch, qkv) -> None:
        if sb.num_cpu:
            q, k, v = qkv
            c = sb.cpu_slice
            self.handoff.send(slot, job_seq(it, layer), q[c], k[c], v[c])

    def _finish(self, slot: int, it: int, layer: int, sb: SubBatch, attn: torch.Tensor) -> None:
        if sb.num_cpu:
            self.handoff.finish(slot, it, layer, attn[sb.cpu_slice])

    def _gpu_attention(self, i: int, sb: SubBatch, qkv) -> torch.Tensor:
        """Attention of the GPU-pool rows and the CPU-bound prefills (CPU decode rows come later)."""
        q, k, v = qkv
        out = torch.empty_like(q)
        scale = self.model.layers[i].self_attn.scale
        if sb.meta is not None:
            g = slice(0, sb.num_gpu)
            write_kv(self.kv_cache[i], sb.meta.slot_mapping, k[g], v[g])
            paged_attention(q[g], self.kv_cache[i], sb.meta, scale, out=out[g])
        if sb.stage_meta is not None:
            s = slice(sb.num_gpu, sb.num_gpu + sb.num_staged)
            write_kv(self.staging, sb.stage_meta.slot_mapping, k[s], v[s])
            paged_attention(q[s], self.staging, sb.stage_meta, scale, out=out[s])
            self.host.stream_out(i, self.staging, sb.stage_runs, self.handoff.side)
        return out
