"""Sizing: from model geometry, the GPU nodes and the host's measured bandwidth to pool sizes.

All formulas are documented in docs/operator.md; the names here follow that page. The basis is the
weakest matching node (least GPU memory, slowest HBM and host memory, fewest cores), so every pod
the Deployment may place fits wherever it lands.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from neo_common.geometry import ModelGeometry
from neo_common.segment import SegmentLayout
from neo_common.tensor_parallel import Shard
from neo_operator.constants import GPU_PRODUCT_LABEL
from neo_operator.gpus import lookup_product
from neo_operator.nodes import NodeFacts
from neo_operator.spec import NeoServiceSpec

MiB = 1 << 20
GiB = 1 << 30

GPU_RUNTIME_RESERVE = 512 * MiB  # CUDA context, allocator slack, graphs
GATEWAY_CPU = 2  # the API server (HTTP, tokenizer, detokenizer) and the engine core (scheduler), one each
GATEWAY_MEMORY = 1 * GiB
GPU_WORKER_CPU = 2  # launch thread + copy/IPC thread
GPU_WORKER_MEMORY = 4 * GiB  # CUDA runtime and host staging; weights stream through the page cache
CPU_ATTENTION_MEMORY = 512 * MiB  # the process itself, besides the shared segment
SHM_SLACK = 64 * MiB  # doorbells, alignment and other users of /dev/shm
OFFLOAD_MIN_GAIN = 0.05  # offload only when it is predicted to add at least 5% decode throughput
# What a replica leaves of a node's allocatable to others: the DaemonSets every GPU node runs (kube-proxy,
# the CNI agent, the NVIDIA device plugin / GPU Feature Discovery / DCGM exporter, a log and a metrics
# agent) request about 0.5-1 CPU and 0.5-1.5 GiB together; the kubelet and the OS are already outside
# allocatable. At least one CPU and 1.5 GiB, and 5% on large nodes, which run more agents. The
# operator's --node-cpu-reserve / --node-memory-reserve-gib / --node-reserve-fraction change them.
NODE_CPU_RESERVE_MIN = 1.0
NODE_MEMORY_RESERVE_MIN = 3 * GiB // 2
NODE_RESERVE_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class NodeReserve:
    """The part of a node's allocatable a replica never requests: ``max(min, fraction * allocatable)``
    of CPUs and of memory bytes."""

    cpu_min: float = NODE_CPU_RESERVE_MIN
    memory_min: int = NODE_MEMORY_RESERVE_MIN
    fraction: float = NODE_RESERVE_FRACTION

    def cpus(self, node_cpus: float) -> float:
        return max(self.cpu_min, self.fraction * node_cpus)

    def memory(self, node_bytes: int) -> int:
        return int(max(self.memory_min, self.fraction * node_bytes))


DEFAULT_RESERVE = NodeReserve()


def node_cpu_reserve(node_cpus: float) -> float:
    return DEFAULT_RESERVE.cpus(node_cpus)


def shm_layouts(g: ModelGeometry, tp: int, cpu_blocks: int, block_size: int, max_rows: int,
                kv_dtype: str) -> list[SegmentLayout]:
    """The shared-memory segments of one replica, as the GPU worker creates them: one per tensor-parallel
    rank (its shard's heads; every rank holds all CPU blocks of its heads), none without offloading."""
    if not cpu_blocks:
        return []
    return [SegmentLayout.for_model(Shard.of(g, r, tp).local_geometry(g), cpu_blocks, block_size, max_rows, kv_dtype)
            for r in range(tp)]


class SizingError(Exception):
    """Sizing is impossible with this spec on these nodes; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SizingPending(Exception):
    """Sizing needs facts not known yet (the host bandwidth of ``nodes``)."""

    def __init__(self, nodes: Sequence[str]) -> None:
        super().__init__(f"waiting for the bandwidth probe on {', '.join(nodes)}")
        self.nodes = list(nodes)


@dataclasses.dataclass(frozen=True)
class SizingDecision:
    """What the operator decided for one replica, as shown in ``status.sizing``."""

    nodes: tuple[str, ...]
    gpu_products: tuple[str, ...]
    gpu_memory_mib: int
    hbm_gbps: float
    host_read_gbps: float | None
    block_size: int
    kv_bytes_per_block: int
    context_tokens: int
    weight_bytes: int
    gpu_kv_blocks: int
    cpu_kv_blocks: int
    shm_bytes: int
    cpu_attention_threads: int
    cpu_attention_gbps: float | None
    offload: bool
    offload_mode: str  # what the engine gets: "off", "auto", "full" or "throughput"
    tensor_parallel_size: int
    predicted_gain: float | None
    reason: str
    requests: dict[str, dict[str, str]]
    probes_pending: tuple[str, ...] = ()  # nodes the bandwidth basis left out: their probe has not finished

    @property
    def shm_quantity(self) -> str:
        return f"{self.shm_bytes // MiB}Mi"

    def to_status(self) -> dict[str, Any]:
        return {
            "nodes": list(self.nodes),
            "gpuProducts": list(self.gpu_products),
            "gpuMemoryMiB": self.gpu_memory_mib,
            "hbmGBps": self.hbm_gbps,
            "hostReadGBps": self.host_read_gbps,
            "blockSize": self.block_size,
            "kvBytesPerBlock": self.kv_bytes_per_block,
            "contextTokens": self.context_tokens,
            "gpuKvBlocks": self.gpu_kv_blocks,
            "cpuKvBlocks": self.cpu_kv_blocks,
            "shmSize": self.shm_quantity,
            "cpuAttentionThreads": self.cpu_attention_threads,
            "cpuAttentionGBps": self.cpu_attention_gbps,
            "offload": self.offload,
            "offloadMode": self.offload_mode,
            "tensorParallelSize": self.tensor_parallel_size,
            "predictedGain": self.predicted_gain,
            "reason": self.reason,
            "requests": self.requests,
            "probesPending": list(self.probes_pending),
        }


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}Gi"


def _check_nodes(spec: NeoServiceSpec, nodes: Sequence[NodeFacts]) -> list[NodeFacts]:
    if not nodes:
        products = ", ".join(spec.gpu.products) or "any"
        raise SizingError("NoMatchingNodes", f"no node carries {GPU_PRODUCT_LABEL} in [{products}] and matches "
                          f"spec.gpu.nodeSelector {spec.gpu.node_selector or {}}; label the GPU nodes (GPU Feature "
                          "Discovery) or widen spec.gpu.products / spec.gpu.nodeSelector")
    for node in nodes:
        if lookup_product(node.gpu_product) is None and not spec.gpu.hbm_gbps:
            raise SizingError("UnknownGpuProduct", f"GPU product {node.gpu_product!r} on node {node.name} is not in the "
                              "operator's table; set spec.gpu.memoryBandwidthGBps to its HBM bandwidth, or restrict "
                              "spec.gpu.products to known products")
        if node.gpu_memory_mib is None:
            raise SizingError("UnknownGpuProduct", f"node {node.name} has no nvidia.com/gpu.memory label and GPU "
                              f"product {node.gpu_product!r} is not in the operator's table; run GPU Feature "
                              "Discovery on the node or restrict spec.gpu.products")
    enough = [n for n in nodes if n.gpu_count >= spec.gpu.count]
    if not enough:
        raise SizingError("InsufficientGpus", f"spec.gpu.count is {spec.gpu.count} but the matching nodes have at most "
                          f"{max(n.gpu_count for n in nodes)} allocatable {spec.gpu.resource_name}; lower spec.gpu.count")
    return enough


def size(spec: NeoServiceSpec, nodes: Sequence[NodeFacts], reserve: NodeReserve = DEFAULT_RESERVE) -> SizingDecision:
    """Decide pool sizes and requests (equal to limits: Guaranteed QoS) for one replica; raises
    SizingError or SizingPending."""
    nodes = _check_nodes(spec, nodes)
    mode = spec.offload.mode
    # Nodes whose bandwidth probe has not finished (or failed): with no node measured, "auto" cannot
    # decide and waits; with one measured, sizing goes on from the measured ones, so a new node whose
    # probe is still running never blocks the scaling of a service that is already sized. The pending
    # nodes are reported, and the service is sized again when their results land.
    missing = [n.name for n in nodes if n.read_gbps is None] if mode == "auto" else []
    if missing and len(missing) == len(nodes):
        raise SizingPending(missing)

    g = spec.model.geometry
    eng = spec.engine
    dt = dtype_bytes(spec.model.dtype)
    count = spec.gpu.count
    gpu_mem_mib = min(n.gpu_memory_mib or 0 for n in nodes)
    hbm = spec.gpu.hbm_gbps or min(lookup_product(n.gpu_product).hbm_gbps for n in nodes)  # type: ignore[union-attr]
    products = [lookup_product(n.gpu_product) for n in nodes]
    tflops = min((p.tensor_tflops for p in products if p is not None), default=None)
    host_gbps = min((n.read_gbps for n in nodes if n.read_gbps is not None), default=None)
    node_cpus = min(n.cpus for n in nodes)
    node_mem = min(n.memory_bytes for n in nodes)
    gpus_per_node = min(n.gpu_count for n in nodes)
    ctx = spec.model.max_context or g.max_position_embeddings
    block_bytes = g.kv_bytes_per_block(eng.block_size, dt)
    try:
        shard = Shard.of(g, 0, count)  # gpu.count > 1: tensor parallelism, one worker rank per GPU
    except ValueError as exc:
        raise SizingError("TensorParallelUnsupported", f"spec.gpu.count {count}: {exc}; lower spec.gpu.count") from None
    rank = shard.local_geometry(g)  # rank 0 holds the largest shard: it bounds every GPU

    # -- GPU pool (per GPU: the rank's layer shard, the replicated embedding and LM head, its KV heads) ----
    weights = rank.weight_bytes(dt)
    workspace = (GPU_RUNTIME_RESERVE
                 + eng.max_num_batched_tokens * (4 * g.hidden_size + 2 * rank.intermediate_size) * dt
                 + eng.max_num_seqs * g.vocab_size * 4)
    budget = int(spec.gpu.memory_utilization * gpu_mem_mib * MiB)
    gpu_kv = budget - weights - workspace
    rank_block_bytes = rank.kv_bytes_per_block(eng.block_size, dt)
    blocks_per_request = math.ceil(ctx / eng.block_size)
    if gpu_kv < blocks_per_request * rank_block_bytes:
        raise SizingError("ModelDoesNotFit", f"{g.name} needs {_gib(weights)} of weights and {_gib(workspace)} of "
                          f"workspace per GPU over {count} GPU(s); {gpu_mem_mib} MiB at utilization "
                          f"{spec.gpu.memory_utilization} leaves {_gib(max(gpu_kv, 0))}, less than one {ctx}-token "
                          f"request's KV ({_gib(blocks_per_request * rank_block_bytes)}); "
                          "raise spec.gpu.count or spec.gpu.memoryUtilization, lower spec.model.maxContext, "
                          "or choose larger GPUs in spec.gpu.products")
    gpu_blocks = gpu_kv // rank_block_bytes

    # -- CPU-attention threads and bandwidth ------------------------------------------------------
    usable_cpus = node_cpus - reserve.cpus(node_cpus)  # what a replica may request at most
    host_share = usable_cpus * count / max(gpus_per_node, 1)  # the host cores that come with our GPUs
    if spec.offload.cores:
        threads = spec.offload.cores
    else:
        threads = max(1, int(host_share) - GATEWAY_CPU - GPU_WORKER_CPU * count)
    threads = max(threads, count)  # one CPU-attention process per rank, at least a thread each
    cpu_gbps = None
    if host_gbps is not None:
        probe_threads = min((n.probe_threads for n in nodes if n.probe_threads), default=None)
        probe_threads = probe_threads or max(1, int(node_cpus))
        cpu_gbps = host_gbps * min(1.0, threads / probe_threads)

    # -- offload decision -------------------------------------------------------------------------
    requested_cpu_blocks = spec.offload.kv_memory_bytes // block_bytes if mode != "off" else 0
    avg_ctx = max(1, ctx // 2)  # a running request is on average half-way through its context
    gpu_batch = min(eng.max_num_seqs, gpu_blocks * eng.block_size / avg_ctx)
    gain: float | None = None
    if mode == "off":
        offload, reason = False, "cpuOffload.mode is off"
    elif requested_cpu_blocks == 0:
        offload, reason = False, "cpuOffload.kvMemory holds less than one KV block"
    elif mode in ("full", "throughput"):
        offload, reason = True, f"cpuOffload.mode is {mode}"
    else:
        assert cpu_gbps is not None
        # dense part of a decode iteration, the roofline: each GPU reads its weights once and does 2 FLOPs
        # per weight and sequence (memory-bound at decode batches, unless the tensor rate is low)
        t_linear = weights / (hbm * 1e9)
        if tflops:
            t_linear = max(t_linear, 2 * rank.num_parameters() * gpu_batch / (tflops * 1e12))
        cpu_tokens = t_linear * cpu_gbps * 1e9 / g.kv_bytes_per_token(dt)  # CPU attention hidden behind it
        cpu_batch = max(0.0, min(eng.max_num_seqs - gpu_batch, cpu_tokens / avg_ctx,
                                 requested_cpu_blocks * eng.block_size / avg_ctx))
        gain = round(cpu_batch / gpu_batch, 3) if gpu_batch > 0 else math.inf
        offload = gain >= OFFLOAD_MIN_GAIN
        if gpu_batch >= eng.max_num_seqs:
            reason = f"GPU KV holds all {eng.max_num_seqs} sequences at {avg_ctx} tokens; offload adds nothing"
        else:
            reason = (f"GPU batch ~{gpu_batch:.1f}, CPU can add ~{cpu_batch:.1f} at {cpu_gbps:.0f} GB/s: "
                      f"predicted gain {gain:.0%} ({'>=' if offload else '<'} {OFFLOAD_MIN_GAIN:.0%})")
    cpu_blocks = requested_cpu_blocks if offload else 0

    # -- shared memory and requests ---------------------------------------------------------------
    # The segments the GPU worker creates (neo_common.segment: the one layout formula), 16-bit KV
    kv_dtype = "float16" if spec.model.dtype == "float16" else "bfloat16"
    layouts = shm_layouts(g, count, cpu_blocks, eng.block_size, eng.max_num_seqs, kv_dtype)
    shm = sum(layout.total_bytes for layout in layouts) + SHM_SLACK
    shm = -(-shm // MiB) * MiB
    att_threads = threads if offload else 1
    pod_memory = GATEWAY_MEMORY + GPU_WORKER_MEMORY * count + CPU_ATTENTION_MEMORY * count + shm
    usable_memory = node_mem - reserve.memory(node_mem)
    if pod_memory > usable_memory:
        fits = max(0, usable_memory - (pod_memory - cpu_blocks * block_bytes))
        raise SizingError("KvMemoryExceedsNode", f"one replica needs {_gib(pod_memory)} of host memory ({_gib(shm)} of "
                          f"/dev/shm for {cpu_blocks} CPU KV blocks) but the smallest matching node has {_gib(node_mem)} "
                          f"allocatable, of which {_gib(reserve.memory(node_mem))} stay free for DaemonSets and system "
                          f"pods; lower spec.cpuOffload.kvMemory to at most {_gib(fits)}")
    pod_cpus = GATEWAY_CPU + GPU_WORKER_CPU * count + att_threads
    if pod_cpus > usable_cpus:
        raise SizingError("CpuExceedsNode", f"one replica needs {pod_cpus} CPUs ({att_threads} for CPU attention) but the "
                          f"smallest matching node has {node_cpus:g} allocatable, of which "
                          f"{reserve.cpus(node_cpus):g} stay free for DaemonSets and system pods; "
                          "lower spec.cpuOffload.cores")
    # Integer CPUs, and limits equal to these requests (deployment.py): a Guaranteed pod whose containers
    # the static CPU manager pins to whole cores. The /dev/shm pages count in the gpu-worker's memory: it
    # creates the segment and pins it for CUDA (cudaHostRegister faults every page in), so its cgroup is
    # charged for them; the cpu-attention process maps pages already resident.
    requests = {
        "gateway": {"cpu": str(GATEWAY_CPU), "memory": f"{GATEWAY_MEMORY // MiB}Mi"},
        "gpuWorker": {"cpu": str(GPU_WORKER_CPU * count), "memory": f"{(GPU_WORKER_MEMORY * count + shm) // MiB}Mi"},
        "cpuAttention": {"cpu": str(att_threads), "memory": f"{CPU_ATTENTION_MEMORY * count // MiB}Mi"},
    }
    return SizingDecision(
        nodes=tuple(n.name for n in nodes),
        gpu_products=tuple(sorted({n.gpu_product for n in nodes})),
        gpu_memory_mib=gpu_mem_mib, hbm_gbps=hbm, host_read_gbps=host_gbps,
        block_size=eng.block_size, kv_bytes_per_block=block_bytes, context_tokens=ctx, weight_bytes=weights,
        gpu_kv_blocks=gpu_blocks, cpu_kv_blocks=cpu_blocks, shm_bytes=shm,
        cpu_attention_threads=att_threads, cpu_attention_gbps=round(cpu_gbps, 1) if cpu_gbps is not None else None,
        offload=offload, offload_mode=(mode if mode in ("full", "throughput") else "auto") if offload else "off",
        predicted_gain=gain, reason=reason + (f"; bandwidth of {', '.join(missing)} not measured yet (its probe "
                                              "has not finished): sized from the measured nodes" if missing else ""),
        requests=requests, tensor_parallel_size=count, probes_pending=tuple(missing),
    )
