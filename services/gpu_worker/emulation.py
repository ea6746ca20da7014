"""GPU emulation for benchmarks (``--emulate-gpu PRESET``; docs/design.md, "GPU emulation").

NEO's gain is a ratio of bandwidths: how much CPU attention hides behind a layer's GPU work. To
measure it for GPUs we cannot rent (T4, A10G, L4), the worker runs on the fast GPU it has and makes
every GPU stage last as long as it would on the preset: a stage is bracketed on its stream by
:class:`StageClock` (``begin``: a device timestamp; ``end``: a device-side spin until the stage has
lasted its preset time), so the stage takes ``max(real, preset roofline)`` and no host
synchronisation is added. The preset time of a stage is ``max(bytes / bandwidth, FLOPs / tensor
rate)`` for the bytes it moves and the FLOPs it does, counted by :class:`Roofline` from the plan.
Host<->device copies are paced the same way at the preset's PCIe rate.

On the CPU device (CI) the clock is the twin: the stage's host thread sleeps until the stage has
lasted its preset time (work there runs synchronously, so host time is the stage's time).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from neo_common.gpu_presets import GpuPreset
from neo_common.protocol import IterationPlan, Place


@dataclasses.dataclass(frozen=True)
class Work:
    """Bytes moved through device memory and FLOPs of some GPU work."""

    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, k: float) -> "Work":
        return Work(self.bytes * k, self.flops * k)


def _bytes_and_count(params) -> tuple[int, int]:
    ps = list(params)
    return sum(p.numel() * p.element_size() for p in ps), sum(p.numel() for p in ps)


class Roofline:
    """Counts the bytes and FLOPs of the worker's GPU stages for one model on one rank.

    - ``pre`` / ``post``: weight (bytes, parameters) of a layer's dense work before attention
      (input norm, q/k/v projection) and after it (o-projection, MLP); read once per stage whatever
      the token count, two FLOPs per parameter per token.
    - ``act_per_token``: activation bytes a token's dense work of one layer reads and writes (an
      estimate: the residual stream in and out, q/k/v, the MLP's intermediate; small beside the
      weights in decode, and beside the FLOPs in prefill).
    - ``kv_per_token``: KV bytes of one token in one layer (k and v of every local KV head).
    - ``head``: the LM head's weight (bytes, parameters).
    """

    def __init__(self, layer: torch.nn.Module, g, kv_dtype: torch.dtype, head: tuple[int, int]) -> None:
        named = list(layer.named_parameters())
        post_names = ("self_attn.o_proj", "post_attention_layernorm", "mlp")
        self.pre = _bytes_and_count(p for n, p in named if not n.startswith(post_names))
        self.post = _bytes_and_count(p for n, p in named if n.startswith(post_names))
        elt = next(p for n, p in named if n.endswith("norm.weight")).element_size()
        self.act_per_token = elt * (4 * g.hidden_size + (g.num_heads + 2 * g.num_kv_heads) * g.head_dim
                                    + 3 * g.intermediate_size)
        self.kv_per_token = 2 * g.num_kv_heads * g.head_dim * torch.empty(0, dtype=kv_dtype).element_size()
        self.qo_per_token = 2 * g.num_heads * g.head_dim * elt
        self.heads_dim = g.num_heads * g.head_dim
        self.num_layers = g.num_layers
        self.head = head

    @classmethod
    def for_model(cls, model: torch.nn.Module, kv_dtype: torch.dtype) -> "Roofline":
        head = model.embed_tokens.weight if getattr(model, "lm_head", None) is None else model.lm_head.weight
        return cls(model.layers[0], model.geometry, kv_dtype, (head.numel() * head.element_size(), head.numel()))

    def dense(self, tokens: int, pre: bool = True, post: bool = True) -> Work:
        """One layer's dense work for ``tokens`` tokens (``pre``/``post``: which side of attention)."""
        if tokens <= 0:
            return Work()
        parts = [p for p, on in ((self.pre, pre), (self.post, post)) if on]
        frac = len(parts) / 2
        return Work(sum(b for b, _ in parts) + tokens * self.act_per_token * frac,
                    2.0 * tokens * sum(n for _, n in parts))

    def attention(self, start_pos: np.ndarray, num_tokens: np.ndarray) -> Work:
        """One layer's attention of rows that start at ``start_pos`` and add ``num_tokens`` tokens
        each (decode rows: one): the KV read once per row plus the new KV written, and
        4 * heads * head_dim FLOPs per (query, key) pair under the causal mask."""
        if not len(start_pos):
            return Work()
        p = start_pos.astype(np.float64)
        n = num_tokens.astype(np.float64)
        pairs = float(np.sum(n * p + n * (n + 1) / 2))
        return Work(float(np.sum(p + n)) * self.kv_per_token + float(np.sum(n)) * self.qo_per_token,
                    4.0 * self.heads_dim * pairs)

    def lm_head(self, rows: int) -> Work:
        if rows <= 0:
            return Work()
        b, n = self.head
        return Work(b, 2.0 * rows * n)

    def forward(self, plan: IterationPlan, rows: np.ndarray) -> Work:
        """A whole GPU-only forward of ``rows`` of ``plan``: every layer's dense work and attention."""
        tokens = int(plan.num_tokens[rows].sum())
        per_layer = self.dense(tokens) + self.attention(plan.start_pos[rows], plan.num_tokens[rows])
        return per_layer * self.num_layers

    def gpu_attended(self, plan: IterationPlan, rows: np.ndarray) -> np.ndarray:
        """The rows among ``rows`` whose attention runs on the GPU (all but CPU decodes)."""
        return rows[plan.places[rows] == Place.GPU] if len(rows) else rows


class StageClock:
    """Makes a stage on one stream last at least its preset time, without a host sync.

    ``begin`` stamps the stream's time when the stage starts on the device; ``end(seconds)`` spins
    on the device until ``seconds`` have passed since that stamp (nothing when the real work took
    longer). On the CPU device both are host-side (the twin). ``stamp`` is the device buffer
    holding the begin time (one per clock: two streams need two clocks).
    """

    def __init__(self, preset: GpuPreset, device: torch.device) -> None:
        self.preset, self.device = preset, device
        self.cuda = device.type == "cuda"
        self.stamp = torch.zeros(1, dtype=torch.int64, device=device) if self.cuda else None
        self._t0 = 0.0
        self.emulated_s = 0.0   # preset seconds asked for since the last reset (a cross-check for tests)

    def begin(self) -> None:
        if self.cuda:
            from neo_gpu_worker.kernels.stage_clock import stamp_now
            stamp_now(self.stamp)
        else:
            self._t0 = time.perf_counter()

    def end(self, seconds: float) -> None:
        self.emulated_s += seconds
        if seconds <= 0:
            return
        if self.cuda:
            from neo_gpu_worker.kernels.stage_clock import spin_until
            spin_until(self.stamp, int(seconds * 1e9))
        else:
            left = self._t0 + seconds - time.perf_counter()
            if left > 0:
                time.sleep(left)

    def work(self, work: Work) -> float:
        """End the stage as the preset would run ``work``; returns the preset seconds."""
        s = self.preset.seconds(work.bytes, work.flops)
        self.end(s)
        return s

    def copy(self, num_bytes: float) -> float:
        """End a copy stage at the preset's PCIe rate; returns the preset seconds."""
        s = self.preset.copy_seconds(num_bytes)
        self.end(s)
        return s


def emulated_name(real_gpu: str, preset: GpuPreset | None) -> str:
    """The GPU a worker reports (and its cost tables are keyed by): the real one, or the preset on it."""
    return real_gpu if preset is None else preset.label(real_gpu)


class Emulator:
    """The worker's emulation: the preset, the model's :class:`Roofline`, a clock for the compute
    stream (``main``) and one for the stream that copies q/k/v to the host (``side``)."""

    def __init__(self, preset: GpuPreset, model: torch.nn.Module, kv_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.preset = preset
        self.roofline = Roofline.for_model(model, kv_dtype)
        self.main = StageClock(preset, device)
        self.side = StageClock(preset, device)


class PipelineStages:
    """The preset cost of each stage of one pipelined forward (``pipeline.PipelinedExecutor``).

    A stage's GPU work is one sub-batch's dense step (``dense=(j, i)``: the post-attention work of
    layer ``i - 1`` and the pre-attention work of layer ``i``; ``i = 0`` and ``i = layers`` are the
    halves at the ends) plus the GPU-attended rows of the other sub-batch (``attention=j``: GPU-pool
    rows and CPU-bound prefills; CPU decodes attend on the host). With no emulator every call is a
    no-op.
    """

    def __init__(self, emulator: Emulator | None, plan: IterationPlan, sbs, layers: int) -> None:
        self.emulator, self.layers = emulator, layers
        if emulator is None:
            return
        r = emulator.roofline
        self.tokens = [sb.num_tokens for sb in sbs]
        self.attention_work = []
        for sb in sbs:
            rows = sb.rows
            on_gpu = rows[~((plan.places[rows] == Place.CPU) & (plan.num_tokens[rows] == 1))]
            self.attention_work.append(r.attention(plan.start_pos[on_gpu], plan.num_tokens[on_gpu]))

    def begin(self) -> None:
        if self.emulator is not None:
            self.emulator.main.begin()

    def end(self, dense: tuple[int, int] | None = None, attention: int | None = None) -> None:
        if self.emulator is None:
            return
        work = Work()
        if dense is not None:
            j, i = dense
            work = work + self.emulator.roofline.dense(self.tokens[j], pre=i < self.layers, post=i > 0)
        if attention is not None:
            work = work + self.attention_work[attention]
        self.emulator.main.work(work)
