"""How models split over tensor-parallel ranks, and the per-rank addresses and segments."""

from __future__ import annotations

import socket

import pytest

from neo_common.config import NeoConfig
from neo_common.geometry import GEOMETRIES
from neo_common.procs import free_port, free_ports, serve_port_flags
from neo_common.tensor_parallel import Shard, rank_address, split_evenly


@pytest.mark.parametrize("total,parts", [(3, 2), (8, 2), (8, 8), (1536, 2), (14336, 3), (7, 4)])
def test_split_evenly_covers_the_range_once_larger_parts_first(total, parts) -> None:
    ranges = [split_evenly(total, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_smollm2_splits_unevenly_by_kv_group() -> None:
    g = GEOMETRIES["smollm2-135m"]  # 9 query heads, 3 KV heads, MLP 1536
    s0, s1 = Shard.of(g, 0, 2), Shard.of(g, 1, 2)
    assert (s0.kv_heads, s0.q_heads, s0.intermediate) == ((0, 2), (0, 6), (0, 768))
    assert (s1.kv_heads, s1.q_heads, s1.intermediate) == ((2, 3), (6, 9), (768, 1536))
    l0, l1 = s0.local_geometry(g), s1.local_geometry(g)
    assert (l0.num_heads, l0.num_kv_heads, l1.num_heads, l1.num_kv_heads) == (6, 2, 3, 1)
    assert l0.hidden_size == l1.hidden_size == g.hidden_size and l0.vocab_size == g.vocab_size
    assert l0.name != l1.name != g.name, "cost tables of different shards never match"
    # rows of full HF tensors: q/o by query heads, k/v by KV heads, MLP by units (o and down by column)
    assert s1.rows("q_proj", 64) == (384, 576) and s1.rows("k_proj", 64) == (128, 192)
    assert s1.rows("o_proj", 64) == (384, 576) and Shard.axis("o_proj") == 1 and Shard.axis("q_proj") == 0
    assert s1.rows("down_proj", 64) == (768, 1536) and Shard.axis("down_proj") == 1
    assert s1.rows("input_layernorm", 64) is None and s1.rows("embed_tokens", 64) is None
    assert Shard.of(g).rows("q_proj", 64) is None and Shard.of(g).local_geometry(g) is g


def test_rank_shards_sum_to_the_model() -> None:
    g = GEOMETRIES["llama-3-70b"]
    shards = [Shard.of(g, r, 8).local_geometry(g) for r in range(8)]
    assert sum(s.num_kv_heads for s in shards) == 8 and sum(s.num_heads for s in shards) == 64
    assert sum(s.intermediate_size for s in shards) == g.intermediate_size
    per_token = sum(s.kv_bytes_per_token(2) for s in shards)
    assert per_token == g.kv_bytes_per_token(2)


def test_more_ranks_than_kv_heads_is_refused_with_the_limit() -> None:
    with pytest.raises(ValueError, match="at most 3"):
        Shard.of(GEOMETRIES["smollm2-135m"], 0, 4)
    with pytest.raises(ValueError, match="rank 2"):
        Shard.of(GEOMETRIES["llama-3-8b"], 2, 2)


def test_each_rank_has_its_own_cpu_attention_address_and_segment() -> None:
    assert rank_address("tcp://127.0.0.1:5602", 0) == "tcp://127.0.0.1:5602"
    assert rank_address("tcp://127.0.0.1:5602", 3) == "tcp://127.0.0.1:5605"
    assert rank_address("ipc:///run/neo/cpu", 1) == "ipc:///run/neo/cpu-tp1"
    config = NeoConfig.from_args(["--tensor-parallel-size", "2", "--cpu-attention-addr", "tcp://127.0.0.1:7000"], env={})
    r0, r1 = config.for_rank(0), config.for_rank(1)
    assert r0 is config and r0.shm_name == "neo-kv-7000"
    assert r1.ipc.cpu_attention_addr == "tcp://127.0.0.1:7001" and r1.shm_name == "neo-kv-7000-tp1"
    assert r1.worker_addr == config.worker_addr, "only rank 0 talks to the gateway"
    named = NeoConfig.from_args(["--shm-name", "kv"], env={}).for_rank(2)
    assert named.shm_name == "kv-tp2"


def test_by_default_every_link_is_a_socket_in_the_replicas_private_directory() -> None:
    config = NeoConfig.from_args(["--tensor-parallel-size", "2", "--runtime-dir", "/run/neo/link"], env={})
    assert config.worker_addr == "ipc:///run/neo/link/worker.sock" and not config.uses_tcp
    assert config.for_rank(1).cpu_attention_addr == "ipc:///run/neo/link/cpu-attention.sock-tp1"
    assert config.for_rank(1).runtime_dir == config.runtime_dir
    assert config.shm_name.startswith("neo-kv-") and config.for_rank(1).shm_name == config.shm_name + "-tp1"
    other = NeoConfig.from_args(["--port", "8001"], env={})
    assert other.runtime_dir != NeoConfig.from_args(["--port", "8002"], env={}).runtime_dir, "one per replica"
    assert other.shm_name != NeoConfig.from_args(["--port", "8002"], env={}).shm_name


def test_tensor_parallel_size_is_validated() -> None:
    with pytest.raises(Exception, match="tensor-parallel-size"):
        NeoConfig.from_args(["--tensor-parallel-size", "0"], env={})
    with pytest.raises(Exception, match="cuda:N"):
        NeoConfig.from_args(["--tensor-parallel-size", "2", "--device", "cuda:1"], env={})
    assert NeoConfig.from_args([], env={"NEO_TENSOR_PARALLEL_SIZE": "4"}).device.tensor_parallel_size == 4


def test_free_port_span_returns_consecutive_free_ports() -> None:
    base = free_port(span=3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_hands_out_disjoint_blocks() -> None:
    for _ in range(50):   # separate free_port calls could return one port twice; these never may
        http, worker, cpu = free_ports(1, 1, 4)
        taken = [http, worker, *range(cpu, cpu + 4)]
        assert len(set(taken)) == 6
    with socket.socket() as s:
        s.bind(("127.0.0.1", http))   # released again once chosen


def test_serve_port_flags_leave_given_flags_alone() -> None:
    flags = serve_port_flags(4)
    assert flags[0::2] == ["--port", "--worker-addr", "--cpu-attention-addr"]
    ports = [int(flags[1]), *(int(v.rsplit(":", 1)[1]) for v in flags[3::2])]
    assert len({ports[0], ports[1], *range(ports[2], ports[2] + 4)}) == 6
    kept = serve_port_flags(1, ["--port=9", "--worker-addr", "tcp://127.0.0.1:7"])
    assert kept[0::2] == ["--cpu-attention-addr"]
