"""The sizing formulas (docs/operator.md) and the decisions they make across GPUs and host bandwidths."""

from __future__ import annotations

import math

import pytest

from neo_common.geometry import GEOMETRIES
from neo_common.segment import SegmentLayout
from neo_common.tensor_parallel import Shard
from neo_operator import sizing
from neo_operator.gpus import GPU_PRODUCTS
from neo_operator.sizing import GiB, MiB, SizingError, SizingPending, size

from op_helpers import make_node, make_spec


def test_gpu_blocks_follow_the_documented_formula() -> None:
    spec = make_spec()
    node = make_node(product="NVIDIA-A10G", memory_mib=23028)
    d = size(spec, [node])
    g = GEOMETRIES["llama-3-8b"]
    # bf16: 2 bytes; K and V, 32 layers, 8 KV heads of 128, 16 tokens per block
    assert d.kv_bytes_per_block == 16 * 2 * 32 * 8 * 128 * 2 == 2 * MiB
    weights = g.num_parameters() * 2
    workspace = 512 * MiB + 2048 * (4 * 4096 + 2 * 14336) * 2 + 256 * 128256 * 4
    expected = (int(0.9 * 23028 * MiB) - weights - workspace) // d.kv_bytes_per_block
    assert d.gpu_kv_blocks == expected
    assert 2000 < d.gpu_kv_blocks < 2600  # ~4.7 GiB of KV after 15 GiB of weights on a 24 GB GPU


def test_cpu_blocks_shm_and_requests() -> None:
    spec = make_spec(cpuOffload={"mode": "full", "kvMemory": "16Gi"})
    d = size(spec, [make_node()])
    assert d.offload and d.offload_mode == "full"
    d = size(make_spec(cpuOffload={"mode": "throughput", "kvMemory": "16Gi"}), [make_node()])
    assert d.offload and d.offload_mode == "throughput" and d.cpu_kv_blocks > 0, "the user's choice, no bandwidth test"
    assert d.cpu_kv_blocks == 16 * GiB // d.kv_bytes_per_block == 8192
    # the segment the GPU worker creates (neo_common.segment), plus the slack: header page, the K and V
    # pools, two staging slots of q, k, v, o rows at bf16, each region 4 KiB aligned
    layout = SegmentLayout.for_model(GEOMETRIES["llama-3-8b"], 8192, 16, 256, "bfloat16")
    slot = 2 * 256 * (2 * 32 + 2 * 8) * 128
    assert layout.total_bytes == 4096 + 16 * GiB + 2 * slot
    assert d.shm_bytes == math.ceil((layout.total_bytes + 64 * MiB) / MiB) * MiB
    assert d.shm_quantity == f"{d.shm_bytes // MiB}Mi"
    # one GPU of one: the whole host less the node reserve (max(1, 5%) = 1.6), the gateway (2: its API
    # server and engine core) and the gpu-worker (2)
    assert d.cpu_attention_threads == int(32 - 1.6) - 4 == 26
    # the segment's pages are the gpu-worker's (it creates and pins them)
    assert d.requests["cpuAttention"] == {"cpu": "26", "memory": "512Mi"}
    assert d.requests["gpuWorker"] == {"cpu": "2", "memory": f"{(4 * GiB + d.shm_bytes) // MiB}Mi"}


def test_threads_are_the_host_share_of_our_gpus_and_scale_bandwidth() -> None:
    # 8 GPUs on a 64-core host: one GPU comes with (64 - 3.2 reserved) / 8 = 7.6 cores, 3 of them for attention
    d = size(make_spec(cpuOffload={"mode": "full"}), [make_node(gpus=8, cpus=64, gbps=200.0, threads=64)])
    assert d.cpu_attention_threads == 3
    assert d.cpu_attention_gbps == pytest.approx(200.0 * 3 / 64, abs=0.05)
    # explicit cores win
    d = size(make_spec(cpuOffload={"mode": "full", "cores": 12}), [make_node(gpus=8, cpus=64, gbps=200.0, threads=64)])
    assert d.cpu_attention_threads == 12


def test_mode_off_allocates_no_cpu_pool_and_needs_no_bandwidth() -> None:
    d = size(make_spec(cpuOffload={"mode": "off"}), [make_node(gbps=None)])
    assert not d.offload and d.offload_mode == "off" and d.cpu_kv_blocks == 0
    assert d.shm_bytes < 128 * MiB
    assert d.requests["cpuAttention"]["cpu"] == "1"


def test_auto_waits_for_the_bandwidth_probe() -> None:
    with pytest.raises(SizingPending) as info:
        size(make_spec(), [make_node("a", gbps=None), make_node("b", gbps=None)])
    assert info.value.nodes == ["a", "b"]


def test_a_pending_probe_does_not_block_sizing_from_the_measured_nodes() -> None:
    """A node that joined and whose probe has not finished: sized from the measured one, the pending one
    reported (a service already sized keeps scaling)."""
    d = size(make_spec(), [make_node("a", gbps=50.0), make_node("b", gbps=None)])
    assert d.host_read_gbps == 50.0 and d.probes_pending == ("b",) and d.nodes == ("a", "b")
    assert "bandwidth of b not measured yet" in d.reason and d.to_status()["probesPending"] == ["b"]


def test_weakest_node_is_the_basis() -> None:
    d = size(make_spec(cpuOffload={"mode": "full"}),
             [make_node("big", memory_mib=81559, product="NVIDIA-H100-80GB-HBM3", cpus=64, gbps=150.0),
              make_node("small", memory_mib=23028, cpus=16, gbps=40.0)])
    assert d.gpu_memory_mib == 23028 and d.host_read_gbps == 40.0 and d.hbm_gbps == 600.0
    assert d.gpu_products == ("NVIDIA-A10G", "NVIDIA-H100-80GB-HBM3")


# GPU product x host bandwidth -> offload decision (mode auto, 32 Gi of host KV, 256 sequences).
# Each row: product, GPUs per replica (= per node), model, max context, host GB/s (probe over all
# cores), host cores, expected offload.
DECISIONS = [
    ("Tesla-T4", 1, "llama-2-7b", 2048, 2.0, 8, False),
    ("Tesla-T4", 1, "llama-2-7b", 2048, 10.0, 8, True),
    ("Tesla-T4", 1, "llama-2-7b", 2048, 40.0, 16, True),
    ("NVIDIA-A10G", 1, "llama-3-8b", 0, 12.0, 8, False),
    ("NVIDIA-A10G", 1, "llama-3-8b", 0, 60.0, 32, True),
    ("NVIDIA-L4", 1, "llama-3-8b", 0, 60.0, 32, True),
    ("NVIDIA-L40S", 1, "llama-3-8b", 0, 60.0, 32, False),
    ("NVIDIA-A100-SXM4-80GB", 1, "llama-3-8b", 0, 100.0, 32, False),
    ("NVIDIA-H100-80GB-HBM3", 1, "llama-3-8b", 0, 103.0, 16, False),
    ("NVIDIA-H200", 1, "llama-3-8b", 0, 103.0, 16, False),
    ("NVIDIA-H100-80GB-HBM3", 2, "llama-3-70b", 0, 30.0, 16, False),
    ("NVIDIA-H100-80GB-HBM3", 2, "llama-3-70b", 0, 200.0, 64, True),
    ("NVIDIA-H200", 2, "llama-3-70b", 0, 103.0, 16, False),
]


def _decide(product: str, count: int, model: str, ctx: int, gbps: float, cores: int):
    spec = make_spec(model={"name": model, "maxContext": ctx}, cpuOffload={"kvMemory": "32Gi"},
                     gpu={"memoryUtilization": 0.95, "count": count})
    mem = GPU_PRODUCTS[product].memory_mib
    return size(spec, [make_node(product=product, memory_mib=mem, gpus=count, cpus=cores, gbps=gbps, threads=cores)])


def test_decision_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for product, count, model, ctx, gbps, cores, expected in DECISIONS:
        d = _decide(product, count, model, ctx, gbps, cores)
        rows.append((f"{count}x {product}", model, gbps, cores, d.gpu_kv_blocks, d.cpu_kv_blocks, d.cpu_attention_threads,
                     d.predicted_gain, d.offload, expected))
    with capsys.disabled():
        print("\n%-27s %-12s %6s %5s %8s %8s %7s %7s %s" % ("GPU", "model", "GB/s", "cores", "GPU blk", "CPU blk",
                                                            "threads", "gain", "offload"))
        for r in rows:
            print("%-27s %-12s %6.0f %5d %8d %8d %7d %7.1f%% %s" % (*r[:7], 100 * r[7], r[8]))
    assert [r[8] for r in rows] == [r[9] for r in rows]


def test_more_host_bandwidth_never_turns_offload_off() -> None:
    gains = [_decide("NVIDIA-A10G", 1, "llama-3-8b", 0, bw, 32).predicted_gain for bw in (5, 20, 40, 80, 160)]
    assert gains == sorted(gains) and gains[-1] > gains[0]


def test_more_gpu_memory_never_raises_the_gain() -> None:
    gains = [_decide(p, 1, "llama-3-8b", 0, 60.0, 32).predicted_gain
             for p in ("NVIDIA-A10G", "NVIDIA-L40S", "NVIDIA-H100-80GB-HBM3")]
    assert gains == sorted(gains, reverse=True)


# -- failures that become conditions -----------------------------------------------------------------
def _reason(spec, nodes) -> str:
    with pytest.raises(SizingError) as info:
        size(spec, nodes)
    assert "spec." in info.value.message, "the message must say which field to change"
    return info.value.reason


def test_no_matching_nodes() -> None:
    assert _reason(make_spec(gpu={"products": ["NVIDIA-H200"]}), []) == "NoMatchingNodes"


def test_unknown_gpu_product() -> None:
    assert _reason(make_spec(), [make_node(product="NVIDIA-Mystery-9000", memory_mib=32768)]) == "UnknownGpuProduct"
    # given the HBM bandwidth, an unknown product with a memory label sizes fine
    d = size(make_spec(gpu={"memoryBandwidthGBps": 900}), [make_node(product="NVIDIA-Mystery-9000", memory_mib=32768)])
    assert d.hbm_gbps == 900 and d.gpu_memory_mib == 32768


def test_insufficient_gpus() -> None:
    assert _reason(make_spec(gpu={"count": 4}), [make_node(gpus=2)]) == "InsufficientGpus"


def test_model_does_not_fit() -> None:
    assert _reason(make_spec(model={"name": "llama-3-70b"}), [make_node()]) == "ModelDoesNotFit"


def test_kv_memory_larger_than_node() -> None:
    with pytest.raises(SizingError) as info:
        size(make_spec(cpuOffload={"mode": "full", "kvMemory": "200Gi"}), [make_node(host_gib=64)])
    assert info.value.reason == "KvMemoryExceedsNode"
    assert "lower spec.cpuOffload.kvMemory to at most" in info.value.message


def test_cores_larger_than_node() -> None:
    assert _reason(make_spec(cpuOffload={"mode": "full", "cores": 64}), [make_node(cpus=16)]) == "CpuExceedsNode"


def test_requests_leave_a_reserve_of_node_allocatable() -> None:
    """A replica never asks for all of a node's CPUs: the DaemonSets there request some too."""
    # 2 + 2 + 12 = 16 CPUs on a 16-CPU node: all of it, so unschedulable beside any DaemonSet
    assert _reason(make_spec(cpuOffload={"mode": "full", "cores": 12}), [make_node(cpus=16)]) == "CpuExceedsNode"
    assert size(make_spec(cpuOffload={"mode": "full", "cores": 11}), [make_node(cpus=16)]).cpu_attention_threads == 11
    for product, count, model, ctx, gbps, cores, _ in DECISIONS:
        d = _decide(product, count, model, ctx, gbps, cores)
        requested = sum(float(r["cpu"]) for r in d.requests.values())
        assert requested <= cores - sizing.node_cpu_reserve(cores), (product, cores, d.requests)
    assert (sizing.node_cpu_reserve(16), sizing.node_cpu_reserve(128)) == (1.0, 6.4)


def test_constants_are_what_the_docs_say() -> None:
    assert sizing.OFFLOAD_MIN_GAIN == 0.05
    assert (sizing.GATEWAY_CPU, sizing.GPU_WORKER_CPU) == (2, 2)


def test_gpu_count_is_tensor_parallelism_sized_per_gpu() -> None:
    """gpu.count 2: each GPU holds half the layers' weights plus the replicated embedding and LM head,
    and half the KV heads, so a block costs each GPU half its bytes; the host is split by ranks."""
    g = GEOMETRIES["llama-3-70b"]
    spec = make_spec(model={"source": "dummy", "name": "llama-3-70b"}, gpu={"count": 2},
                     cpuOffload={"mode": "full", "kvMemory": "32Gi"})
    d = size(spec, [make_node(product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, gpus=2, cpus=64, gbps=200.0)])
    assert d.tensor_parallel_size == 2 and d.to_status()["tensorParallelSize"] == 2
    h, inter, layers = g.hidden_size, g.intermediate_size, g.num_layers
    per_layer = h * (32 * 128) + 2 * h * (4 * 128) + (32 * 128) * h + 3 * h * (inter // 2) + 2 * h
    weights = (layers * per_layer + 2 * g.vocab_size * h + h) * 2
    workspace = 512 * MiB + 2048 * (4 * h + 2 * inter // 2) * 2 + 256 * g.vocab_size * 4
    rank_block = 16 * 2 * layers * 4 * 128 * 2
    assert d.weight_bytes == weights
    assert d.gpu_kv_blocks == (int(0.9 * 81559 * MiB) - weights - workspace) // rank_block
    assert d.kv_bytes_per_block == 2 * rank_block, "the CPU pool holds both ranks' heads"
    assert d.cpu_attention_threads == int(64 - 0.05 * 64) - 2 - 2 * 2
    assert d.requests["gpuWorker"] == {"cpu": "4", "memory": f"{(8 * GiB + d.shm_bytes) // MiB}Mi"}
    # one segment per rank, each with its 4 of the 8 KV heads (and 32 of the 64 query heads)
    ranks = [SegmentLayout.for_model(Shard.of(g, r, 2).local_geometry(g), d.cpu_kv_blocks, 16, 256, "bfloat16")
             for r in range(2)]
    assert [r.num_kv_heads for r in ranks] == [4, 4]
    assert d.shm_bytes == -(-(sum(r.total_bytes for r in ranks) + 64 * MiB) // MiB) * MiB


def test_gpu_count_beyond_the_kv_heads_is_refused() -> None:
    spec = make_spec(model={"source": "dummy", "name": "llama-3-8b"}, gpu={"count": 16})
    with pytest.raises(SizingError) as err:
        size(spec, [make_node(product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, gpus=16, cpus=128)])
    assert err.value.reason == "TensorParallelUnsupported"
    assert "spec.gpu.count 16" in err.value.message and "at most 8" in err.value.message


def test_the_node_reserve_is_configurable() -> None:
    """--node-cpu-reserve / --node-memory-reserve-gib / --node-reserve-fraction: what a replica leaves free."""
    from neo_operator.opconfig import OperatorConfig

    assert sizing.DEFAULT_RESERVE == OperatorConfig.from_args([]).node_reserve
    spec = make_spec(cpuOffload={"mode": "full", "kvMemory": "16Gi"})
    assert size(spec, [make_node(cpus=32)]).cpu_attention_threads == 26
    reserve = OperatorConfig.from_args(["--node-cpu-reserve", "4", "--node-memory-reserve-gib", "110"]).node_reserve
    assert reserve == sizing.NodeReserve(cpu_min=4.0, memory_min=110 * GiB, fraction=0.05)
    with pytest.raises(SizingError) as info:
        size(spec, [make_node(cpus=32, host_gib=128)], reserve)
    assert info.value.reason == "KvMemoryExceedsNode" and "110.0Gi stay free" in info.value.message
    d = size(spec, [make_node(cpus=32)], sizing.NodeReserve(cpu_min=4.0))
    assert d.cpu_attention_threads == 32 - 4 - 4
    # the default leaves 1.5 GiB (5% on large nodes): a replica filling a 24 GiB node to the byte does not fit
    assert sizing.DEFAULT_RESERVE.memory(24 * GiB) == 1.5 * GiB and sizing.DEFAULT_RESERVE.memory(512 * GiB) == int(25.6 * GiB)
    with pytest.raises(Exception):
        OperatorConfig.from_args(["--node-reserve-fraction", "1.5"])


def test_gpu_table_has_the_datasheet_numbers_of_the_cards_the_benchmarks_emulate() -> None:
    """T4, A10G, L4 and L40S: memory, bandwidth, dense 16-bit tensor rate and PCIe rate, the same
    numbers as the benchmarks' emulation presets."""
    from neo_common.gpu_presets import GPU_PRESETS

    for preset in GPU_PRESETS.values():
        p = GPU_PRODUCTS[preset.product]
        assert (p.hbm_gbps, p.tensor_tflops, p.pcie_gbps) == (preset.bandwidth_gbs, preset.tensor_tflops, preset.pcie_gbs)
        assert 0.9 < p.memory_mib / 1024 / preset.memory_gib <= 1.0, p  # GB on the box, GFD's usable MiB
    assert (GPU_PRODUCTS["Tesla-T4"].tensor_tflops, GPU_PRODUCTS["NVIDIA-L40S"].hbm_gbps) == (65.0, 864.0)
    for p in GPU_PRODUCTS.values():
        assert p.memory_mib > 0 and p.hbm_gbps > 0 and p.tensor_tflops > 0 and p.pcie_gbps >= 16, p


def test_a_low_tensor_rate_makes_the_dense_step_compute_bound() -> None:
    """The dense time is the roofline: on a T4 (65 TFLOPS) a large GPU batch is compute-bound, so
    the CPU has more time to hide attention behind it than weights / bandwidth alone would give."""
    spec = make_spec(model={"name": "smollm2-135m", "maxContext": 2048}, cpuOffload={"kvMemory": "8Gi"},
                     engine={"maxNumSeqs": 4096})
    node = make_node(product="Tesla-T4", memory_mib=15360, cpus=16, gbps=40.0, threads=16)
    with_rate = size(spec, [node]).predicted_gain
    saved = GPU_PRODUCTS["Tesla-T4"]
    try:
        import dataclasses
        GPU_PRODUCTS["Tesla-T4"] = dataclasses.replace(saved, tensor_tflops=1e6)
        without = size(spec, [node]).predicted_gain
    finally:
        GPU_PRODUCTS["Tesla-T4"] = saved
    assert with_rate > without
