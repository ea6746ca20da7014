"""`neo gpu-worker`: the data-plane process that holds the weights and the GPU KV pool.

It connects to the gateway, loads the model, sizes the KV pool, says WorkerReady, and then runs
each IterationPlan it receives, answering with an IterationResult. It keeps no request state.
With ``--tensor-parallel-size N`` this process is rank 0 and starts ranks 1..N-1 (``parallel``):
each loads its shard on GPU r and runs every plan rank 0 forwards to it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Sequence

import torch
import zmq

from neo_common import gpu_presets, tracing
from neo_common.config import NeoConfig
from neo_common.link import prepare_runtime_dir, secure_connect
from neo_common.logs import setup_logging
from neo_common.procs import die_with_parent
from neo_common.shutdown import STOP_SIGNALS, ConnectionWatch, SignalStop
from neo_common.model_source import read_geometry, resolve
from neo_common.settings import ConfigError
from neo_common.tensor_parallel import Shard
from neo_common.protocol import Hello, Shutdown, WorkerError, WorkerKind, WorkerReady
from neo_common.host_kernel.cpus import available_cpus
from neo_common.segment import SegmentLayout
from neo_gpu_worker import ops
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.device import DTYPES, pick_device, pick_dtype
from neo_gpu_worker.emulation import Emulator, emulated_name
from neo_gpu_worker.loader import load_model
from neo_gpu_worker.model_runner import ModelRunner, num_kv_blocks
from neo_gpu_worker.parallel import FollowerLinks, TensorParallel, start_followers
from neo_gpu_worker.serve_loop import IterationLoop, follow_plans
from neo_gpu_worker.stage_graphs import StageGraphs

log = logging.getLogger(__name__)



# Collectives wait this long at most: rank 0 profiles the cost tables (minutes, at the first start)
# while the other ranks wait for it in the next collective.
_GROUP_TIMEOUT_S = 3600.0
_FOLLOWER_EXIT_S = 10.0   # a follower that does not exit by then is terminated with this process


def build_runner(config: NeoConfig, rank: int = 0, init_method: str = "") -> tuple[ModelRunner, WorkerReady]:
    """Load this rank's shard and size its pools (every rank of a group calls it at once: the
    pools are sized to what every rank can hold)."""
    world = config.device.tensor_parallel_size
    device = pick_device(config.device.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif world > 1:
        torch.set_num_threads(max(1, available_cpus() // world))  # the ranks share this host's cores
    ops.configure(config.device.kernels, device)
    dtype = pick_dtype(config.model.dtype, device)
    source = resolve(config.model)
    full = read_geometry(source)
    try:
        shard = Shard.of(full, rank, world)
    except ValueError as exc:
        raise ConfigError(f"--tensor-parallel-size {world}: {exc}") from None
    trained = full.max_position_embeddings
    max_len = config.model.max_model_len or trained
    if max_len > trained:
        raise ConfigError(f"--max-model-len {max_len} exceeds the model's context length {trained}")
    tp = TensorParallel(shard, device)
    tp.init_group(init_method, _GROUP_TIMEOUT_S)
    # GPU emulation times the float32 model (its roofline counts the layers' parameters)
    model = load_model(source, max_len, device, dtype, config.model.seed, tp, gguf_blocks=not config.device.emulate_gpu)
    g = model.geometry
    kv_name = config.cache.resolve_kv_dtype(str(dtype).removeprefix("torch."), config.offload_enabled)
    kv_dtype = DTYPES[kv_name]
    bs = config.cache.block_size
    host, staging, cost_tables = None, 0, None
    if config.offload_enabled:
        # The cost tables first: profiling allocates and frees device memory of its own. Rank 0
        # profiles its own shard (the largest one) for the policy; the others need none.
        if rank == 0:
            cost_tables = load_cost_tables(config)
        host = HostKv(config.for_rank(rank).shm_name, SegmentLayout.for_model(
            g, num_cpu_blocks(config, model.full_geometry, kv_dtype), bs, config.scheduler.max_num_seqs, kv_name))
        staging = -(-config.scheduler.max_num_batched_tokens // bs) + config.scheduler.max_num_seqs
    graphs = ops.uses_graphs(device, config.device.enforce_eager)
    graph_max_batch = min(config.scheduler.max_num_seqs, 512) if graphs else 0
    stage_graphs = None
    if graph_max_batch and host is not None and config.device.pipeline_graphs:
        # Captured before the KV pool is sized (they do not read it), so the free memory that sizes
        # the pool already lacks their buffers and graph pool (852 MiB per rank for 70B at TP=2).
        stage_graphs = StageGraphs(model, graph_max_batch, device)
        with torch.inference_mode():
            stage_graphs.capture()
    blocks = tp.min_int(num_kv_blocks(model, device, bs, kv_dtype, config.cache.num_gpu_blocks,
                                      config.cache.gpu_memory_utilization, config.cache.cpu_device_kv_gb))
    preset = gpu_presets.preset(config.device.emulate_gpu) if config.device.emulate_gpu else None
    emulator = Emulator(preset, model, kv_dtype, device) if preset else None
    real_gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if preset:
        log.warning("GPU emulation on: every GPU stage lasts as long as on %s (%.0f GB/s, %.0f TFLOPS, PCIe %.0f "
                    "GB/s): %s; a benchmark instrument, not a serving mode", preset.product, preset.bandwidth_gbs,
                    preset.tensor_tflops, preset.pcie_gbs, preset.label(real_gpu))
    runner = ModelRunner(model, blocks, bs, device, kv_dtype, host, staging, config.ipc.worker_timeout_s,
                         graph_max_batch=graph_max_batch, max_model_len=max_len, tp=tp, stage_graphs=stage_graphs,
                         emulator=emulator)
    ready = WorkerReady(kind=WorkerKind.GPU_WORKER, pid=os.getpid(), num_gpu_blocks=blocks,
                        block_size=bs, max_model_len=max_len, geometry=full,
                        device=emulated_name(real_gpu, preset),
                        dtype=str(dtype).removeprefix("torch."), kv_dtype=kv_name,
                        num_cpu_blocks=host.segment.layout.num_blocks if host else 0, cost_tables=cost_tables)
    log.info("KV pool: %d blocks x %d tokens (%s) on %s%s", blocks, bs, kv_name, device,
             f"; host pool {ready.num_cpu_blocks} blocks" if host else "")
    return runner, ready


def num_cpu_blocks(config: NeoConfig, g, kv_dtype: torch.dtype) -> int:
    """Host pool blocks: as asked, else ``--cpu-kv-gb`` worth (of the whole model's KV: under
    tensor parallelism the ranks' pools together hold that budget)."""
    if config.cache.num_cpu_blocks:
        return config.cache.num_cpu_blocks
    per_block = g.kv_bytes_per_block(config.cache.block_size, torch.empty((), dtype=kv_dtype).element_size())
    return max(1, int(config.cache.cpu_kv_gb * 2**30 // per_block))


def load_cost_tables(config: NeoConfig):
    """``--cost-tables`` if given, else this machine's cached profile of the model (rank 0's shard
    under tensor parallelism), profiled now if missing; the quick grid on the CPU device, where the
    full one would take long and matters little."""
    from neo_common.cost_model import CostTables
    from neo_gpu_worker.profiler import load_or_profile

    if config.scheduler.cost_tables:
        return CostTables.load(config.scheduler.cost_tables)
    quick = pick_device(config.device.device).type == "cpu"
    tables, path = load_or_profile(config, quick=quick, progress=False)
    log.info("cost tables: %s", path)
    return tables


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(0)  # unwinds through `finally`, so queued spans are flushed


def _ignore_stop_signals() -> None:
    """Unwinding: the cleanup (the host segment's unlink above all) must not be cut short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _MainThreadExit:
    """How a signalled GPU worker stops: SystemExit in the main thread, which unwinds through the
    cleanup in ``serve``. The watch thread of ``SignalStop`` wakes the main thread with the same
    signal (a blocking receive returns to Python for it); raised once."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, _reason: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        elif not self.raised:
            self.raised = True
            raise SystemExit(0)


def serve(config: NeoConfig) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = ConnectionWatch(sock)   # whether the gateway is there decides when a SIGTERM stops us
    try:
        secure_connect(sock, config.worker_addr, config.runtime_dir)
        SignalStop("gpu_worker", config.http.shutdown_grace_s, lambda: watch.connected, _MainThreadExit()).install()
        sock.send(Hello(kind=WorkerKind.GPU_WORKER, pid=os.getpid()).encode())
        return _serve_gateway(config, ctx, sock, watch)
    finally:
        _ignore_stop_signals()
        watch.close()
        sock.close(linger=0)
        ctx.term()


def _serve_gateway(config: NeoConfig, ctx: zmq.Context, sock: zmq.Socket, watch: ConnectionWatch) -> int:
    """Start the followers, load, say ready, serve plans until Shutdown (or a stop signal)."""
    world = config.device.tensor_parallel_size
    followers = FollowerLinks(ctx, world, prepare_runtime_dir(config.runtime_dir)) if world > 1 else None
    try:
        init_method = start_followers(config, followers, follow) if followers else ""
        runner, ready = build_runner(config, 0, init_method)
    except Exception as exc:
        log.exception("worker failed to start")
        sock.send(WorkerError(message=f"worker failed to start: {exc}", fatal=True).encode())
        time.sleep(0.2)  # let the frame leave before the socket closes
        return 1
    sock.send(ready.encode())
    try:
        return IterationLoop(sock, runner, ready, followers, config.device.launch_ahead,
                             connects=lambda: watch.connects).run()
    finally:
        _ignore_stop_signals()
        if followers is not None:
            followers.stopping = True
            followers.forward(Shutdown(reason="rank 0 exits").encode(), wait=False)
            for proc in followers.procs:
                proc.join(_FOLLOWER_EXIT_S)
            followers.close()
        runner.close()


def follow(config: NeoConfig, rank: int, init_method: str, frames_addr: str) -> None:
    """A follower rank (a child of rank 0): load the shard, then run every plan rank 0 forwards."""
    setup_logging(config.http.log_level, f"gpu_worker.tp{rank}")
    for sig in STOP_SIGNALS:   # rank 0 stops its followers; a terminal's Ctrl-C is rank 0's to handle
        signal.signal(sig, _exit_on_sigterm if sig == signal.SIGTERM else signal.SIG_IGN)
    if not die_with_parent(signal.SIGTERM, multiprocessing.parent_process().pid):
        raise SystemExit(1)   # rank 0 is gone already
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(frames_addr)
    runner, _ = build_runner(config, rank, init_method)
    try:
        follow_plans(sock, runner)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 may terminate us while we unwind
    finally:
        runner.close()
        sock.close(linger=0)
        ctx.term()


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.for_process("neo gpu-worker", __doc__, argv, "gpu_worker")
    for sig in STOP_SIGNALS:   # until serve() connects: nothing to wait for (SIGINT may come ignored)
        signal.signal(sig, _exit_on_sigterm)
    tracing.setup_tracing("neo-gpu-worker")
    try:
        return serve(config)
    finally:
        tracing.shutdown_tracing()
