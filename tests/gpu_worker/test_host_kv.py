"""The GPU worker's view of the shared KV segment: what it writes, an attached process reads;
pinned for CUDA where CUDA exists (copies land straight in shared memory); removed on close."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from neo_common.segment import KvSegment, SegmentLayout
from neo_gpu_worker import host_kv
from neo_gpu_worker.host_kv import HostKv


def layout() -> SegmentLayout:
    return SegmentLayout(num_layers=2, num_blocks=8, num_kv_heads=2, num_q_heads=6, head_dim=64, block_size=16,
                         max_rows=4, dtype="bfloat16")


def test_views_alias_the_segment_an_attached_process_sees():
    name = f"neo-test-hostkv-{os.getpid()}"
    host = HostKv(name, layout())
    try:
        assert host.pinned == torch.cuda.is_available()
        assert tuple(host.k_pool.shape) == (2, 8, 2, 16, 64) and host.k_pool.dtype == torch.bfloat16
        data = torch.randn(2, 16, 64).to(torch.bfloat16)
        if host.pinned:  # device -> pinned shared memory, asynchronously, as the pipelined executor will
            src = data.cuda()
            host.k_pool[1, 3].copy_(src, non_blocking=True)
            torch.cuda.synchronize()
        else:
            host.k_pool[1, 3].copy_(data)
        other = KvSegment.attach(name, timeout_s=5)
        try:
            seen = other.k_pool()[1, 3]
            assert np.array_equal(seen, data.view(torch.uint16).numpy())
        finally:
            other.close()
    finally:
        host.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_pinned_copies_beat_pageable_ones_on_cuda():
    """On a CUDA machine the registered segment copies at pinned speed; elsewhere this checks the
    unpinned path still moves the bytes."""
    name = f"neo-test-hostkv-bw-{os.getpid()}"
    big = SegmentLayout(num_layers=4, num_blocks=512, num_kv_heads=8, num_q_heads=32, head_dim=128,
                        block_size=16, max_rows=4, dtype="bfloat16")  # 256 MiB per pool
    host = HostKv(name, big)
    try:
        dst = host.k_pool
        if not host.pinned:
            dst.copy_(torch.ones_like(dst))
            assert bool((dst[-1, -1] == 1).all())
            return
        src = torch.randn(dst.shape, device="cuda").to(torch.bfloat16)
        pageable = torch.empty(dst.shape, dtype=dst.dtype)

        def rate(target: torch.Tensor) -> float:
            target.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                target.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            return 5 * target.numel() * 2 / (time.perf_counter() - t0) / 1e9

        pinned_gbps, pageable_gbps = rate(dst), rate(pageable)
        print(f"device->host: pinned shared segment {pinned_gbps:.1f} GB/s, pageable {pageable_gbps:.1f} GB/s")
        assert pinned_gbps > 1.5 * pageable_gbps and pinned_gbps > 20
    finally:
        host.close()


def test_stream_out_puts_each_staged_block_in_its_host_block_in_the_host_layout():
    lay = layout()
    host = HostKv(f"neo-test-hostkv-stream-{os.getpid()}", lay)
    try:
        device = torch.device("cuda" if host.pinned else "cpu")
        staging = torch.randn((2, 6, lay.block_size, lay.num_kv_heads, lay.head_dim)).to(torch.bfloat16).to(device)
        runs = np.array([[0, 5, 2], [2, 1, 1], [3, 2, 2]], np.int32)   # staging 5 is unused
        before = [host.k_pool.clone(), host.v_pool.clone()]
        side = torch.cuda.Stream() if host.pinned else None
        host.stream_out(1, staging, runs, side)
        if side is not None:
            side.synchronize()
        for src, dst, n in runs.tolist():
            for i in range(n):
                for side_ix, pool in ((0, host.k_pool), (1, host.v_pool)):
                    want = staging[side_ix, src + i].transpose(0, 1).cpu()   # [H, bs, D]
                    assert torch.equal(pool[1, dst + i], want)
        untouched = [b for b in range(lay.num_blocks) if b not in (5, 6, 1, 2, 3)]
        for pool, old in zip((host.k_pool, host.v_pool), before):
            assert torch.equal(pool[1, untouched], old[1, untouched]) and torch.equal(pool[0], old[0])
    finally:
        host.close()


def _swap_round_trip(host: HostKv, lay: SegmentLayout, device: torch.device) -> None:
    """swap_out then swap_in against a block-by-block reference: every run's blocks land in their
    destination in the other layout, all layers, and nothing else changes."""
    blocks = 12
    kv = torch.randn((lay.num_layers, 2, blocks, lay.block_size, lay.num_kv_heads, lay.head_dim))
    kv = kv.to(torch.bfloat16).to(device)
    out_runs = np.array([[0, 5, 2], [7, 0, 1], [3, 2, 3]], np.int32)   # gpu, host, count
    before = [host.k_pool.clone(), host.v_pool.clone()]
    host.swap_out(kv, out_runs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    written = set()
    for src, dst, n in out_runs.tolist():
        for i in range(n):
            written.add(dst + i)
            for side, pool in ((0, host.k_pool), (1, host.v_pool)):
                for layer in range(lay.num_layers):
                    assert torch.equal(pool[layer, dst + i], kv[layer, side, src + i].transpose(0, 1).cpu())
    untouched = [b for b in range(lay.num_blocks) if b not in written]
    for pool, old in zip((host.k_pool, host.v_pool), before):
        assert torch.equal(pool[:, untouched], old[:, untouched])

    back = torch.zeros_like(kv)
    in_runs = np.array([[2, 9, 3], [5, 0, 2]], np.int32)                # host, gpu, count
    host.swap_in(back, in_runs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(back[:, :, 9:12], kv[:, :, 3:6]) and torch.equal(back[:, :, 0:2], kv[:, :, 0:2])
    assert not back[:, :, 2:9].any()


def test_swaps_move_every_layer_of_each_run_between_the_layouts():
    lay = layout()
    host = HostKv(f"neo-test-hostkv-swap-{os.getpid()}", lay, pin=False)
    try:
        _swap_round_trip(host, lay, torch.device("cpu"))
    finally:
        host.close()


def test_staging_chunks_split_runs_and_keep_every_block_once():
    runs = np.array([[0, 10, 5], [7, 2, 1], [20, 30, 6]], np.int64)
    chunks = list(host_kv._chunks(runs, 4))
    assert [int(c[:, 2].sum()) for c in chunks] == [4, 4, 4]
    flat = [(s + i, d + i) for c in chunks for s, d, n in c.tolist() for i in range(n)]
    assert flat == [(s + i, d + i) for s, d, n in runs.tolist() for i in range(n)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU host runs it)")
@pytest.mark.parametrize("two_d", [True, False], ids=["dma-2d", "per-layer"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-2-blocks"])
def test_cuda_swaps_match_the_reference_with_and_without_the_2d_copy(two_d, chunked, monkeypatch):
    lay = layout()
    if chunked:   # two blocks of every layer and side per staging chunk: runs split across chunks
        block = 2 * lay.num_layers * lay.num_kv_heads * lay.block_size * lay.head_dim * 2
        monkeypatch.setattr(host_kv, "STAGING_BYTES", 2 * block)
    host = HostKv(f"neo-test-hostkv-swap-cuda-{os.getpid()}", lay)
    try:
        assert host.dma is not None, "libcudart not found: the 2-D copy is off on this GPU host"
        if not two_d:
            host.dma = None
        _swap_round_trip(host, lay, torch.device("cuda"))
    finally:
        host.close()


def test_a_cpu_process_replaced_mid_iteration_fails_the_wait_at_once():
    """The iteration's plan went to the process attached when it began; a restarted one that
    attaches meanwhile will never answer, so the worker must not wait out its timeout."""
    from neo_gpu_worker.pipeline import Handoff

    host = HostKv(f"neo-test-hostkv-replaced-{os.getpid()}", layout(), pin=False)
    try:
        handoff = Handoff(host, torch.device("cpu"), timeout_s=60)
        host.segment.set_cpu_state(os.getppid(), 1)       # the process serving this iteration
        handoff.begin()
        host.segment.set_cpu_state(os.getpid(), 1)        # another live process attached since
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="replaced during iteration 7"):
            handoff.finish(0, 7, 0, torch.empty((1, 6, 64), dtype=torch.bfloat16))
        assert time.monotonic() - t0 < 5
        handoff.begin()                                     # the next iteration waits for the new one
        assert handoff.serving_pid == os.getpid()
    finally:
        host.close()
