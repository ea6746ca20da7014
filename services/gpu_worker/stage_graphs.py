"""Dense work of the pipelined forward (``pipeline.py``), per sub-batch and layer boundary.

Between attention i-1 and attention i a sub-batch runs *boundary i*: the post-attention work of
layer i-1 (O-projection, all-reduce under tensor parallelism, residual, MLP) and the pre-attention
work of layer i (norm, QKV, RoPE); boundary 0 is the embedding, boundary L the last post-attention
work and the final norm. A pipelined iteration runs 2 x (L + 1) of them with a CPU hand-off between
each pair, so they cannot be one graph as a GPU-only decode is. Launched from Python, each boundary
is ~15 kernels (two NCCL calls under TP), and at 80 layers x 2 sub-batches the host's launching,
not the GPU, sets the iteration time. :class:`StageGraphs` captures every boundary of every layer
once per token-count bucket and sub-batch, so a stage launches one replay plus its attention.

A graph replays fixed addresses: each sub-batch has static buffers (token ids, positions, the
residual stream ``x``, attention output ``attn``, and q/k/v), sized for the largest bucket. Rows
past the sub-batch's tokens up to its bucket are padding (token 0 at position 0): dense work is
row-independent, and attention reads and writes only the real rows. The next replay of a
sub-batch overwrites its q/k/v while the side stream may still be copying them to the host only if
the executor launched it early: it launches boundary i+1 of a sub-batch after ``Handoff.finish``
of layer i returned, which waited for that copy (the host, not stream order, keeps this safe).

:class:`EagerDense` is the same interface over fresh tensors, for sub-batches larger than every
bucket (long prefills) and for ``--enforce-eager``. On the CPU device nothing is captured and
:class:`StageGraphs` calls the boundaries over its static buffers: that twin is what CI checks.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from neo_gpu_worker.batch import SubBatch
from neo_gpu_worker.cuda_graph import capture, warm_up
from neo_gpu_worker.models.protocol import CausalLM

log = logging.getLogger(__name__)


def boundary(model: CausalLM, i: int, input_ids: torch.Tensor, positions: torch.Tensor,
             x: torch.Tensor | None, attn: torch.Tensor | None):
    """Boundary ``i`` of one sub-batch: ``(x, (q, k, v))``, or ``(final hidden, None)`` for i = L."""
    layers = model.layers
    x = model.embed(input_ids) if i == 0 else layers[i - 1].post_attn(x, attn)
    if i == len(layers):
        return model.norm(x), None
    return x, layers[i].pre_attn(x, positions, model.rope)


def stage_buckets(max_tokens: int) -> list[int]:
    """Powers of two up to 64, then multiples of 64, up to ``max_tokens`` (and it). Coarser than the
    decode graphs' buckets: there are L + 1 graphs per bucket and sub-batch, and padding dense rows
    costs little while the weights' bytes, not the rows, bound a decode layer."""
    sizes = {b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_tokens}
    return sorted(sizes | set(range(128, max_tokens + 1, 64)) | {max_tokens})


class EagerDense:
    """Dense state of one pipelined forward in fresh tensors (no graphs).

    Per sub-batch j: ``x[j]`` the residual stream after the last boundary run, ``qkv[j]`` the q/k/v
    it produced, ``attn[j]`` the attention output the next boundary reads (allocated by
    :meth:`attn_out`, filled by the executor).
    """

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.sbs: list[SubBatch] = []
        self.x: list = [None, None]
        self.qkv: list = [None, None]
        self.attn: list = [None, None]

    def begin(self, sbs: list[SubBatch]) -> None:
        self.sbs = sbs

    def step(self, j: int, i: int) -> None:
        sb = self.sbs[j]
        self.x[j], self.qkv[j] = boundary(self.model, i, sb.input_ids, sb.positions, self.x[j], self.attn[j])

    def attn_out(self, j: int) -> torch.Tensor:
        self.attn[j] = torch.empty_like(self.qkv[j][0])
        return self.attn[j]

    def hidden(self, j: int) -> torch.Tensor:
        return self.x[j]


class _Static:
    """One sub-batch's static buffers (``max_tokens`` rows each; see the module docstring)."""

    def __init__(self, model: CausalLM, rows: int, device: torch.device, dtype: torch.dtype) -> None:
        g = model.geometry
        self.ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.x = torch.zeros((rows, g.hidden_size), dtype=dtype, device=device)
        self.attn = torch.zeros((rows, g.num_heads, g.head_dim), dtype=dtype, device=device)
        self.q = torch.zeros((rows, g.num_heads, g.head_dim), dtype=dtype, device=device)
        self.k = torch.zeros((rows, g.num_kv_heads, g.head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((rows, g.num_kv_heads, g.head_dim), dtype=dtype, device=device)


class StageGraphs:
    """Captured boundaries of both sub-batches, and the static buffers they read and write.

    - ``buckets``: token counts captured; a sub-batch runs in the smallest bucket that holds it.
    - ``static[j]``: sub-batch j's buffers; rewritten by :meth:`begin` every iteration (padding rows
      included), then by the replays.
    - ``graphs[j][bucket]``: the L + 1 boundary graphs (Nones on the CPU device, where
      :meth:`step` calls the boundary instead).
    - ``sizes[j]``: tokens and bucket of sub-batch j in the current iteration (set by :meth:`begin`).
    """

    def __init__(self, model: CausalLM, max_tokens: int, device: torch.device) -> None:
        self.model, self.device = model, device
        self.buckets = stage_buckets(max_tokens)
        dtype = next(model.parameters()).dtype
        self.static = [_Static(model, self.buckets[-1], device, dtype) for _ in (0, 1)]
        self.graphs: list[dict[int, list]] = [{}, {}]
        self.sizes = [(0, 0), (0, 0)]

    def fits(self, sbs: list[SubBatch]) -> bool:
        return all(sb.num_tokens <= self.buckets[-1] for sb in sbs)

    def _run(self, j: int, bucket: int, i: int) -> None:
        s = self.static[j]
        x, qkv = boundary(self.model, i, s.ids[:bucket], s.positions[:bucket], s.x[:bucket], s.attn[:bucket])
        s.x[:bucket].copy_(x)
        if qkv is not None:
            for dst, src in zip((s.q, s.k, s.v), qkv):
                dst[:bucket].copy_(src)

    def capture(self) -> None:
        """Capture every boundary of both sub-batches per bucket, largest first, one memory pool."""
        layers = len(self.model.layers)
        if self.device.type != "cuda":
            self.graphs = [{b: [None] * (layers + 1) for b in self.buckets} for _ in (0, 1)]
            return
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for bucket in reversed(self.buckets):
            # one warm-up per shape: sub-batch 1's buffers have sub-batch 0's shapes
            warm_up(self.device, lambda: [self._run(0, bucket, i) for i in range(layers + 1)])
            for j in (0, 1):
                graphs = []
                for i in range(layers + 1):
                    graph, _ = capture(functools.partial(self._run, j, bucket, i), pool)
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[j][bucket] = graphs
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()   # the warm-ups' freed blocks: the worker sizes its KV pool from what is free next
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        log.info("captured %d pipeline-stage CUDA graphs (2 sub-batches x %d boundaries x tokens %d..%d) "
                 "in %.1f s, %.0f MiB", 2 * (layers + 1) * len(self.buckets), layers + 1, self.buckets[0],
                 self.buckets[-1], time.perf_counter() - t0, used)

    def begin(self, sbs: list[SubBatch]) -> None:
        """Copy each sub-batch's token ids and positions in, padding to its bucket."""
        for j, sb in enumerate(sbs):
            n = sb.num_tokens
            bucket = next((b for b in self.buckets if b >= n), 0) if n else 0
            self.sizes[j] = (n, bucket)
            if not n:
                continue
            s = self.static[j]
            s.ids[:n].copy_(sb.input_ids)
            s.positions[:n].copy_(sb.positions)
            s.ids[n:bucket].zero_()
            s.positions[n:bucket].zero_()
            s.attn[n:bucket].zero_()   # padding rows' attention: defined, not whatever an earlier batch left

    def step(self, j: int, i: int) -> None:
        bucket = self.sizes[j][1]
        graph = self.graphs[j][bucket][i]
        if graph is None:
            self._run(j, bucket, i)
        else:
            graph.replay()

    @property
    def qkv(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(s.q[:n], s.k[:n], s.v[:n]) for s, (n, _) in zip(self.static, self.sizes)]

    def attn_out(self, j: int) -> torch.Tensor:
        return self.static[j].attn[:self.sizes[j][0]]

    def hidden(self, j: int) -> torch.Tensor:
        return self.static[j].x[:self.sizes[j][0]]
