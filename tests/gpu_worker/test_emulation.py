"""GPU emulation (``--emulate-gpu``): the roofline arithmetic of each stage kind against
hand-computed times, the stage clock's CPU twin, and a whole GPU-only forward through a
``ModelRunner`` that lasts its preset time. On a GPU host the CUDA test times a real emulated stage."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from neo_common.config import NeoConfig
from neo_common.geometry import lookup
from neo_common.gpu_presets import GPU_PRESETS, preset
from neo_common.protocol import IterationPlan
from neo_common.settings import ConfigError
from neo_gpu_worker import ops
from neo_gpu_worker.emulation import Emulator, PipelineStages, Roofline, StageClock, Work, emulated_name
from neo_gpu_worker.loader import build_model

G = dataclasses.replace(lookup("smollm2-135m"), num_layers=3)
MAX_LEN = 256


@pytest.fixture(scope="module")
def model():
    m = build_model(G, MAX_LEN, torch.device("cpu"), torch.float32)
    m.init_random(0)
    return m


def hand_counts(g):
    """Parameters before attention (input norm, q/k/v) and after it (o, post norm, gate/up, down)."""
    h, hd = g.hidden_size, g.head_dim
    pre = h + h * (g.num_heads + 2 * g.num_kv_heads) * hd
    post = g.num_heads * hd * h + h + 3 * h * g.intermediate_size
    return pre, post


def test_presets_are_datasheet_rooflines():
    t4 = preset("t4")
    assert t4.seconds(320e9, 0) == pytest.approx(1.0)          # 320 GB/s
    assert t4.seconds(0, 65e12) == pytest.approx(1.0)          # 65 TFLOPS
    assert t4.seconds(32e9, 65e12) == pytest.approx(1.0)       # the larger term wins
    assert t4.copy_seconds(16e9) == pytest.approx(1.0)         # PCIe 3.0 x16
    assert set(GPU_PRESETS) >= {"t4", "a10g", "l4", "l40s"}
    assert t4.label("NVIDIA H200") == "emulated t4 on NVIDIA H200" == emulated_name("NVIDIA H200", t4)
    assert emulated_name("NVIDIA H200", None) == "NVIDIA H200"
    with pytest.raises(ValueError, match="t4, a10g"):
        preset("v100")


def test_the_flag_is_validated():
    assert NeoConfig.from_args(["--emulate-gpu", "l4"]).device.emulate_gpu == "l4"
    assert NeoConfig.from_args([]).device.emulate_gpu == ""
    with pytest.raises(ConfigError, match="--emulate-gpu 'h100'"):
        NeoConfig.from_args(["--emulate-gpu", "h100"])


def test_roofline_counts_each_stage_kind(model):
    r = Roofline.for_model(model, torch.bfloat16)
    pre, post = hand_counts(G)
    assert r.pre == (4 * pre, pre) and r.post == (4 * post, post)   # float32 weights
    # dense: weights once, two FLOPs per parameter per token; halves at the ends of the pipeline
    d = r.dense(10)
    assert d.flops == 2 * 10 * (pre + post)
    assert d.bytes == 4 * (pre + post) + 10 * r.act_per_token
    assert r.dense(10, post=False).flops == 2 * 10 * pre
    assert r.dense(0) == Work()
    # decode attention: a row of context c reads c tokens of KV (bf16, 3 heads x 64) and does 4*c*9*64 FLOPs
    kv_tok = 2 * 3 * 64 * 2
    a = r.attention(np.array([99, 199]), np.array([1, 1]))
    assert a.flops == 4 * 9 * 64 * (100 + 200)
    assert a.bytes == (100 + 200) * kv_tok + 2 * r.qo_per_token
    # prefill of 8 tokens after 4 cached: pairs under the causal mask = sum(5..12) = 68
    p = r.attention(np.array([4]), np.array([8]))
    assert p.flops == 4 * 9 * 64 * 68
    assert p.bytes == 12 * kv_tok + 8 * r.qo_per_token
    # LM head: the tied embedding read once, 2 * rows * vocab * hidden FLOPs
    assert r.lm_head(3) == Work(4 * G.vocab_size * G.hidden_size, 2 * 3 * G.vocab_size * G.hidden_size)
    # a T4 runs one decode layer of 64 rows at 1000 tokens of context in max(bytes/BW, FLOPs/rate)
    t4 = preset("t4")
    w = r.dense(64) + r.attention(np.full(64, 999), np.ones(64, np.int64))
    assert t4.seconds(w.bytes, w.flops) == pytest.approx(max(w.bytes / 320e9, w.flops / 65e12))


def test_pipeline_stages_price_dense_and_gpu_attended_rows(model):
    """Stage A of layer i: sub-batch 1's dense step plus sub-batch 0's GPU-attended rows (its CPU
    decodes attend on the host and cost the GPU nothing)."""
    emu = Emulator(preset("l4"), model, torch.bfloat16, torch.device("cpu"))
    plan = IterationPlan(places=np.array([0, 1, 1, 0], np.uint8), start_pos=np.array([50, 70, 0, 30], np.int32),
                         num_tokens=np.array([1, 1, 16, 1], np.int32), sub_batch=np.array([0, 0, 0, 1], np.uint8))

    @dataclasses.dataclass
    class Sb:
        rows: np.ndarray
        num_tokens: int

    sbs = [Sb(np.array([0, 2, 1]), 18), Sb(np.array([3]), 1)]
    stages = PipelineStages(emu, plan, sbs, G.num_layers)
    r = emu.roofline
    # row 1 is a CPU decode: not in the GPU attention; row 2 is a CPU-bound prefill: attended on the GPU
    assert stages.attention_work[0] == r.attention(np.array([50, 0]), np.array([1, 16]))
    stages.begin()
    stages.end(dense=(1, 1), attention=0)
    want = r.dense(1) + r.attention(np.array([50, 0]), np.array([1, 16]))
    assert emu.main.emulated_s == pytest.approx(preset("l4").seconds(want.bytes, want.flops))
    emu.main.emulated_s = 0.0
    stages.begin()
    stages.end(dense=(0, 0))   # the first half-step: q/k/v only
    assert emu.main.emulated_s == pytest.approx(preset("l4").seconds(*dataclasses.astuple(r.dense(18, post=False))))
    assert PipelineStages(None, plan, sbs, 3).end(dense=(0, 1)) is None   # off: nothing


def test_stage_clock_twin_never_shortens_and_pads_to_the_preset():
    clock = StageClock(preset("t4"), torch.device("cpu"))
    clock.begin()
    t0 = time.perf_counter()
    clock.end(0.05)
    assert time.perf_counter() - t0 >= 0.045
    clock.begin()
    time.sleep(0.03)   # the real work took longer than the preset time: no extra delay
    t0 = time.perf_counter()
    clock.end(0.01)
    assert time.perf_counter() - t0 < 0.01


def test_a_forward_lasts_its_preset_time(model):
    """A GPU-only iteration through the ModelRunner on the CPU twin: its wall time is at least the
    preset time of its forward plus its LM head, and the clock was asked for exactly those."""
    from neo_gpu_worker.model_runner import ModelRunner

    ops.configure("torch", torch.device("cpu"))
    # A slow fake card so the preset, not this CPU, decides the time (a 135M model in 3 layers is tiny).
    slow = dataclasses.replace(preset("t4"), name="slow", bandwidth_gbs=0.05, tensor_tflops=0.05)
    emu = Emulator(slow, model, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, 16, 16, torch.device("cpu"), torch.float32, emulator=emu)
    try:
        n = 3
        plan = IterationPlan(iteration_id=1, seq_ids=np.arange(n, dtype=np.int64), places=np.zeros(n, np.uint8),
                             sub_batch=np.zeros(n, np.uint8), start_pos=np.zeros(n, np.int32),
                             num_tokens=np.full(n, 5, np.int32),
                             token_ids=np.arange(100, 100 + 5 * n, dtype=np.int32),
                             block_tables=np.arange(n, dtype=np.int32).reshape(n, 1),
                             sample=np.ones(n, np.uint8), temperature=np.zeros(n, np.float32),
                             top_p=np.ones(n, np.float32), top_k=np.zeros(n, np.int32),
                             seeds=np.zeros(n, np.int64), steps=np.zeros(n, np.int32))
        r = emu.roofline
        fwd = (r.dense(15) + r.attention(np.zeros(n), np.full(n, 5))) * G.num_layers
        want = slow.seconds(fwd.bytes, fwd.flops) + slow.seconds(*dataclasses.astuple(r.lm_head(n)))
        t0 = time.perf_counter()
        result = runner.execute(plan)
        wall = time.perf_counter() - t0
        assert len(result.token_ids) == n
        assert emu.main.emulated_s == pytest.approx(want)
        assert wall >= want * 0.95
    finally:
        runner.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")
def test_cuda_emulated_stage_lasts_its_preset_time():
    """A dense stage of a known size on the real GPU (four decode-sized GEMMs over an 8192^2
    weight: ~0.9 ms on an A10G, about a layer of an 8B model), bracketed by the device clock, lasts
    its preset time within 5%, and the host does not wait for it. (The clock's own cost, the stamp
    and the spin's exit, is ~15 us per stage: 7% of a 0.22 ms stage, under 2% of this one.)"""
    device = torch.device("cuda", 0)
    a10g = preset("a10g")
    w = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    x = torch.randn(16, 8192, device=device, dtype=torch.bfloat16)
    work = Work(w.numel() * 2, 2.0 * 16 * w.numel()) * 4
    want = a10g.seconds(work.bytes, work.flops)          # 4 x 134 MB at 600 GB/s: ~0.9 ms

    def stage() -> None:
        for _ in range(4):
            x @ w.T
    clock = StageClock(a10g, device)
    for _ in range(3):   # warm-up: Triton compiles, cuBLAS handles
        clock.begin()
        stage()
        clock.work(work)
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        clock.begin()
        stage()
        clock.work(work)
        host.append(time.perf_counter() - t0)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    measured = float(np.median(times))
    assert measured == pytest.approx(want, rel=0.05), (measured, want)
    assert float(np.median(host)) < want   # launched, not waited for
