"""`neo profile`: measure this machine's per-layer cost tables and cache them (docs/design.md, "The
offload policy and cost tables").

What is timed, per layer (a few layers of dummy weights of the real geometry; seconds per layer is
the total over those layers divided by their count, so weights are not unrealistically hot):

- ``linr(S)``: the dense path of the model family's decoder layer for S tokens with the attention call left
  out (norms, fused QKV, RoPE, KV write, O-proj, MLP, residuals); see :func:`dense_part`.
- ``pref(S)``: ``attention.paged_attention`` for one prompt of S tokens at offset 0.
- ``gdec(N)``: ``paged_attention`` for decode rows holding N tokens in all, rows of
  ``min(N, decode_ctx)`` tokens over shuffled blocks (paged, not contiguous).
- ``cdec(B, N)``: the native kernel ``neo_common.host_kernel.kernel.attend`` (with the k/v append) for B
  requests of N/B tokens each, with the given thread count, on 16-bit KV (bf16, or fp16 for fp16).
- ``lnch``: the fixed host cost of one stage handoff: copy one row's q/k/v device->host (pinned on
  CUDA), synchronise, copy o host->device, synchronise. It leaves out the doorbell wait on the
  cpu_attention process, which that process's own tests measure.

Each point is the median of ``reps`` timed runs after a warm-up. Noise can make a larger size time
a hair faster; tables are made monotone with a running maximum (more work never costs less; for
``cdec`` along both axes, which is conservative where B requests over the same N tokens ran faster
than fewer, longer ones), and the raw medians are kept under ``meta.raw``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

from neo_common.config import NeoConfig
from neo_common.geometry import ModelGeometry, Quantization
from neo_common.logs import setup_logging
from neo_common.model_source import read_geometry, resolve
from neo_common.tensor_parallel import Shard
from neo_common import cost_model, gpu_presets
from neo_common.gpu_presets import GpuPreset
from neo_common.cost_model import CostKey, CostTables
from neo_gpu_worker import fp8, ops
from neo_gpu_worker.attention import AttentionMetadata, PrefillSpan, paged_attention
from neo_gpu_worker.cuda_graph import capture
from neo_gpu_worker.device import pick_device, pick_dtype
from neo_gpu_worker.emulation import Roofline, StageClock, emulated_name
from neo_gpu_worker.models import model_class
from neo_gpu_worker.models.protocol import DecoderLayer
from neo_gpu_worker.rope import RotaryEmbedding

log = logging.getLogger(__name__)

# Grids: (linr tokens, pref tokens, gdec tokens, cdec requests, cdec tokens, decode_ctx, reps)
FULL_GRID = ([1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], [16, 64, 256, 1024, 2048, 4096, 8192],
             [256, 1024, 4096, 16384, 65536, 262144], [1, 4, 16, 64, 256],
             [256, 1024, 4096, 16384, 65536, 262144], 1024, 7)
QUICK_GRID = ([1, 16, 64, 256], [16, 64, 256], [64, 256, 1024, 4096], [1, 4, 16], [64, 256, 1024, 4096], 256, 5)


class Progress:
    """A progress bar over ``total`` measurements: tqdm when importable, else an INFO log every ~10%."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.done, self.desc, self._last = total, 0, desc, -1
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="pt")
            except ImportError:
                pass

    def step(self, what: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
            return
        decile = 10 * self.done // max(1, self.total)
        if decile != self._last:
            self._last = decile
            log.info("%s: %d/%d (%s)", self.desc, self.done, self.total, what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _timer(device: torch.device, reps: int) -> Callable[..., float]:
    """Median seconds of ``fn``; with ``graph`` its replay from a CUDA graph captured once (the GPU's
    time alone, as the worker pays it when it replays graphs)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], object], graph: bool = False) -> float:
        fn()  # warm-up: allocator, caches, lazy init, Triton compiles, cuBLAS workspaces
        sync()
        if graph:
            fn = capture(fn)[0].replay
            fn()
            sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def dense_part(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
               kv_layer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``DecoderLayer.forward`` without ``paged_attention`` (q stands in for its output: same shape)."""
    q, _, _ = layer.pre_attn(x, positions, rope, store=(kv_layer, slots))
    return layer.post_attn(x, q)


def _bf16_bits(rng: np.random.Generator, shape: tuple[int, ...], kv_dtype: str) -> np.ndarray:
    """Raw 16-bit KV of ``shape``: 64K random values tiled (the kernel's speed does not depend on
    them, and drawing gigabytes of normals would dominate the profile's run time)."""
    vals = np.resize(rng.standard_normal(min(65536, math.prod(shape)), dtype=np.float32), shape)
    if kv_dtype == "float16":
        return vals.astype(np.float16).view(np.uint16)
    return (vals.view(np.uint32) >> 16).astype(np.uint16)


class _Bench:
    """The model pieces and KV pools of one profiling run (device memory is freed with it)."""

    def __init__(self, g: ModelGeometry, device: torch.device, dtype: torch.dtype, block_size: int,
                 layers: int, max_tokens: int, seed: int = 0) -> None:
        self.g, self.device, self.dtype, self.bs = g, device, dtype, block_size
        torch.manual_seed(seed)
        self.layers = [self._layer(g, device, dtype) for _ in range(layers)]
        self.rope = RotaryEmbedding(g.head_dim, max_tokens + 1, g.rope_theta, g.rope_scaling, device)
        self.scale = g.attn_scale
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _layer(g: ModelGeometry, device: torch.device, dtype: torch.dtype) -> DecoderLayer:
        """One layer of random weights, its dense layers FP8 when the geometry says so (the
        worker's tables must time the matmuls it runs)."""
        with torch.device("meta"):
            layer = model_class(g).layer_class(g).to(dtype=dtype)
        if g.quantization == Quantization.FP8:
            fp8.quantize_modules(layer)
        layer = layer.to_empty(device=device)
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            elif p.dtype != fp8.FP8 and not name.endswith("weight_scale"):
                p.data.normal_(0.0, 0.02)
        for m in layer.modules():
            if isinstance(m, fp8.Fp8Linear):
                m.set_weight(torch.empty(m.weight.shape, device=device).normal_(0.0, 0.02))
        fp8.prepare(layer, device, dtype)
        return layer.eval()

    def kv(self, tokens: int) -> torch.Tensor:
        blocks = -(-tokens // self.bs)
        return torch.randn((2, blocks, self.bs, self.g.num_kv_heads, self.g.head_dim), device=self.device,
                           dtype=self.dtype)

    def _slots(self, rows: int, length: int) -> torch.Tensor:
        """``[rows, length]`` slots of rows holding shuffled blocks of one pool."""
        per_row = -(-length // self.bs)
        blocks = torch.from_numpy(self.rng.permutation(rows * per_row)).view(rows, per_row)
        j = torch.arange(length)
        return (blocks[:, j // self.bs] * self.bs + j % self.bs).to(self.device)

    def linr(self, tokens: int) -> Callable[[], object]:
        x = torch.randn((tokens, self.g.hidden_size), device=self.device, dtype=self.dtype)
        pos = torch.arange(tokens, device=self.device)
        kv = self.kv(tokens)
        slots = self._slots(1, tokens)[0]
        return lambda: [dense_part(layer, x, pos, self.rope, kv, slots) for layer in self.layers]

    def pref(self, tokens: int) -> Callable[[], object]:
        g = self.g
        q = torch.randn((tokens, g.num_heads, g.head_dim), device=self.device, dtype=self.dtype)
        kv = self.kv(tokens)
        slots = self._slots(1, tokens)[0]
        meta = AttentionMetadata.for_prefill(slots, PrefillSpan(0, tokens, 0, slots))
        return lambda: [paged_attention(q, kv, meta, self.scale) for _ in self.layers]

    def gdec(self, tokens: int, decode_ctx: int) -> Callable[[], object]:
        g = self.g
        length = min(tokens, decode_ctx)
        rows = max(1, tokens // length)
        per_row = -(-length // self.bs)
        q = torch.randn((rows, g.num_heads, g.head_dim), device=self.device, dtype=self.dtype)
        kv = self.kv(rows * per_row * self.bs)
        tables = torch.from_numpy(self.rng.permutation(rows * per_row).astype(np.int32)).view(rows, per_row)
        lens = torch.full((rows,), length, dtype=torch.int32)
        meta = AttentionMetadata.for_decodes(torch.arange(rows, device=self.device), tables.to(self.device),
                                             lens.to(self.device), length)
        return lambda: [paged_attention(q, kv, meta, self.scale) for _ in self.layers]

    def cdec(self, requests: int, tokens: int, kv_dtype: str) -> Callable[[], object]:
        from neo_common.host_kernel.kernel import attend

        g = self.g
        length = max(1, tokens // requests)
        per_row = -(-length // self.bs)
        nb = requests * per_row
        pools = [(_bf16_bits(self.rng, (nb, g.num_kv_heads, self.bs, g.head_dim), kv_dtype),
                  _bf16_bits(self.rng, (nb, g.num_kv_heads, self.bs, g.head_dim), kv_dtype))
                 for _ in self.layers]
        tables = self.rng.permutation(nb).astype(np.int32).reshape(requests, per_row)
        lens = np.full(requests, length, np.int32)
        q = _bf16_bits(self.rng, (requests, g.num_heads, g.head_dim), kv_dtype)
        k_new = _bf16_bits(self.rng, (requests, g.num_kv_heads, g.head_dim), kv_dtype)
        v_new = _bf16_bits(self.rng, (requests, g.num_kv_heads, g.head_dim), kv_dtype)
        out = np.empty_like(q)
        return lambda: [attend(q, kc, vc, tables, lens, k_new=k_new, v_new=v_new, out=out, dtype=kv_dtype,
                               scale=self.scale) for kc, vc in pools]

    def lnch(self) -> Callable[[], object]:
        g = self.g
        width = (g.num_heads + 2 * g.num_kv_heads) * g.head_dim
        dev_qkv = torch.randn((1, width), device=self.device, dtype=self.dtype)
        dev_o = torch.empty((1, g.num_heads * g.head_dim), device=self.device, dtype=self.dtype)
        pin = self.device.type == "cuda"
        host_qkv = torch.empty((1, width), dtype=self.dtype, pin_memory=pin)
        host_o = torch.zeros((1, g.num_heads * g.head_dim), dtype=self.dtype, pin_memory=pin)
        sync = torch.cuda.synchronize if pin else (lambda: None)

        def stage() -> None:
            host_qkv.copy_(dev_qkv, non_blocking=True)
            sync()
            dev_o.copy_(host_o, non_blocking=True)
            sync()
        return stage


def _monotone(ys: Sequence[float]) -> list[float]:
    return [float(v) for v in np.maximum.accumulate(np.asarray(ys, dtype=np.float64))]


def _emulated(bench: "_Bench", preset: GpuPreset | None, dtype: torch.dtype):
    """``wrap(fn, work)``: ``fn`` bracketed by a stage clock of ``preset`` for ``work`` per layer
    (identity without a preset), so the tables price the emulated GPU as the worker runs it."""
    if preset is None:
        return lambda fn, work: fn
    roofline = Roofline(bench.layers[0], bench.g, dtype, (0, 0))
    clock = StageClock(preset, bench.device)
    layers = len(bench.layers)

    def wrap(fn: Callable[[], object], work) -> Callable[[], object]:
        def run() -> None:
            clock.begin()
            fn()
            clock.work(work(roofline) * layers)
        return run
    return wrap


def profile(g: ModelGeometry, device: torch.device, dtype: torch.dtype, block_size: int, cpu_threads: int,
            grid: tuple = QUICK_GRID, layers: int = 2, progress: bool = True, graphs: bool = False,
            preset: GpuPreset | None = None) -> CostTables:
    """Measure every table on ``device`` (CPU attention on this host with ``cpu_threads`` threads).
    With ``graphs`` (the worker replays CUDA graphs) ``linr`` and ``gdec`` are timed as graph
    replays: launched from Python, an 8B layer's dense work for a few rows takes ~3x its GPU time,
    and tables built from that would overstate every decode plan (more for the plan that
    replays a whole decode step than for the pipelined one), so the policy would pipeline at a loss."""
    from neo_common.host_kernel import kernel

    linr_x, pref_x, gdec_x, cdec_b, cdec_n, decode_ctx, reps = grid
    threads = kernel.set_num_threads(cpu_threads)
    kv_dtype = "float16" if dtype == torch.float16 else "bfloat16"
    gpu = emulated_name(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", preset)
    graphs = graphs and device.type == "cuda"
    key = CostKey.from_geometry(g, gpu, str(dtype).removeprefix("torch."), block_size, threads,
                                ops.kernels_for(device, graphs))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > os.cpu_count():  # other work competes for the cores: every time below is inflated
        log.warning("host is busy (load %.1f on %d CPUs): the tables will overstate costs", load, os.cpu_count())
    bench = _Bench(g, device, dtype, block_size, layers, max(linr_x + pref_x))
    timeit = _timer(device, reps)
    bar = Progress(len(linr_x) + len(pref_x) + len(gdec_x) + len(cdec_b) * len(cdec_n) + 1,
                   f"profiling {g.name} on {gpu}", progress)
    raw: dict[str, list] = {"linr": [], "pref": [], "gdec": [], "cdec": []}
    t0 = time.perf_counter()
    emulate = _emulated(bench, preset, dtype)
    one = np.ones(1, np.int64)
    with torch.inference_mode():
        for s in linr_x:
            raw["linr"].append(timeit(emulate(bench.linr(s), lambda r, s=s: r.dense(s)), graphs) / layers)
            bar.step(f"linr {s}")
        for s in pref_x:
            raw["pref"].append(timeit(emulate(bench.pref(s), lambda r, s=s: r.attention(0 * one, s * one))) / layers)
            bar.step(f"pref {s}")
        for n in gdec_x:
            length = min(n, decode_ctx)
            rows = max(1, n // length)
            work = lambda r, rows=rows, length=length: r.attention(np.full(rows, length - 1), np.ones(rows, np.int64))  # noqa: E731
            raw["gdec"].append(timeit(emulate(bench.gdec(n, decode_ctx), work), graphs) / layers)
            bar.step(f"gdec {n}")
        for b in cdec_b:
            raw["cdec"].append([timeit(bench.cdec(b, n, kv_dtype)) / layers for n in cdec_n])
            for n in cdec_n:
                bar.step(f"cdec {b}x{n}")
        lnch = timeit(bench.lnch())
        bar.step("lnch")
    bar.close()
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the worker sizes its KV pool from the free memory right after this
    cdec_y = np.maximum.accumulate(np.maximum.accumulate(np.asarray(raw["cdec"]), axis=0), axis=1)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": time.perf_counter() - t0,
            "emulated": None if preset is None else dataclasses.asdict(preset),
            "layers": layers, "reps": reps, "decode_ctx": decode_ctx, "cpu_kv_dtype": kv_dtype,
            "cpu_isa": kernel.isa(), "torch": torch.__version__, "host": platform.machine(),
            "load_before": load, "raw": raw}
    tables = CostTables(key, list(linr_x), _monotone(raw["linr"]), list(pref_x), _monotone(raw["pref"]),
                        list(gdec_x), _monotone(raw["gdec"]), list(cdec_b), list(cdec_n),
                        [[float(v) for v in row] for row in cdec_y], float(lnch), meta)
    log.info("profiled %s in %.1f s: linr(1)=%.1f us, gdec(%d)=%.1f us, cdec(1,%d)=%.1f us, lnch=%.1f us",
             g.name, meta["seconds"], tables.linr(1) * 1e6, gdec_x[-1], tables.gdec(gdec_x[-1]) * 1e6,
             cdec_n[-1], tables.cdec(1, cdec_n[-1]) * 1e6, lnch * 1e6)
    return tables


def load_or_profile(config: NeoConfig, cache_dir: str | None = None, quick: bool = False, layers: int = 2,
                    force: bool = False, progress: bool = True) -> tuple[CostTables, str]:
    """The cached tables for this config's model/device/dtype/block size/threads, profiling if absent.
    With ``--tensor-parallel-size`` they are rank 0's shard (the largest, so it bounds every rank's
    costs), profiled with its share of the CPU threads. (The ranks' all-reduces are not in ``linr``.)

    Returns the tables and the path of their file (under ``cache_dir``, default
    :func:`cost_model.default_cache_dir`).
    """
    from neo_common.host_kernel.cpus import threads_per_rank

    device = pick_device(config.device.device)
    dtype = pick_dtype(config.model.dtype, device)
    full = read_geometry(resolve(config.model))
    g = Shard.of(full, 0, config.device.tensor_parallel_size).local_geometry(full)
    preset = gpu_presets.preset(config.device.emulate_gpu) if config.device.emulate_gpu else None
    gpu = emulated_name(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", preset)
    threads = threads_per_rank(config.device.cpu_threads, config.device.tensor_parallel_size)
    ops.configure(config.device.kernels, device)  # the tables time the kernels the worker will run
    graphs = ops.uses_graphs(device, config.device.enforce_eager)
    key = CostKey.from_geometry(g, gpu, str(dtype).removeprefix("torch."), config.cache.block_size, threads,
                                ops.kernels_for(device, graphs))
    path = cost_model.cache_path(key, cache_dir)
    if not force:
        found = cost_model.find(key, cache_dir)
        if found is not None:
            return found, path
    tables = profile(g, device, dtype, config.cache.block_size, threads, QUICK_GRID if quick else FULL_GRID,
                     layers, progress, graphs, preset)
    if tables.key != key:  # the kernel's pool may be capped below what was asked
        path = cost_model.cache_path(tables.key, cache_dir)
    return tables, tables.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neo profile", description=__doc__.split("\n")[0])
    NeoConfig.add_arguments(parser)
    tool = parser.add_argument_group("profile")
    tool.add_argument("--quick", action="store_true", help="small grids (seconds on a CPU; for tests)")
    tool.add_argument("--layers", type=int, default=2, help="layers timed per point (costs are per layer)")
    tool.add_argument("--cache-dir", default=None, help=f"where tables live [env {cost_model.CACHE_ENV}]")
    tool.add_argument("--output", default=None, help="also write the tables to this file")
    tool.add_argument("--force", action="store_true", help="profile again even if a matching file exists")
    tool.add_argument("--no-progress", action="store_true", help="log progress instead of a bar")
    args = parser.parse_args(argv)
    config = NeoConfig.from_namespace(args)
    setup_logging(config.http.log_level, "profile")
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    tables, path = load_or_profile(config, args.cache_dir, args.quick, args.layers, args.force,
                                   not args.no_progress)
    if args.output:
        tables.save(args.output)
        path = args.output
    log.info("cost tables: %s", path)
    return 0
