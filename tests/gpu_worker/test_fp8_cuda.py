"""The FP8 GEMM path on a GPU with FP8 tensor cores (compute capability >= 8.9; skipped elsewhere):
``torch._scaled_mm`` with per-token activation scales against the dequantizing reference, the
Triton row quantizer against its torch twin, CUDA-graph replays of an FP8 model against its eager
forward, and an FP8 checkpoint in bf16 against ``transformers`` on its dequantized weights.

Tolerances: ``_scaled_mm`` against a float32 matmul of the same FP8 operands, relative L2 error 1e-2
(bf16 output); against the unquantized activations, 5e-2 (the activations' e4m3 rounding: at most
2**-4 of each row's largest value); the weight-only kernel of decode batches against the float32
matmul of the dequantized weight, 1e-2; model logits against the dequantized reference, 0.1 (as the
CPU tests' FP8 tolerance: one e4m3 rounding of the activations at every dense layer).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from neo_common.geometry import lookup
from neo_common.model_source import ModelSource
from neo_gpu_worker import fp8, ops
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.loader import build_model, load_model
from neo_gpu_worker.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and fp8.supports_fp8(torch.device("cuda", 0))),
                                reason="needs a CUDA GPU with FP8 tensor cores")
DEVICE = torch.device("cuda", 0)
BS, BLOCKS, MAX_LEN = 16, 64, 256


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def torch_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def fp8_layer(k: int, n: int, seed: int) -> fp8.Fp8Linear:
    layer = fp8.Fp8Linear(k, n, None).to(DEVICE)
    layer.set_weight(torch.randn(n, k, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed)) * 0.02)
    fp8.prepare(layer, DEVICE, torch.bfloat16)
    assert layer.scaled_mm and layer.w8a16_rows == fp8.W8A16_ROWS
    return layer


def activations(rows: int, k: int) -> torch.Tensor:
    x = torch.randn(rows, k, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(rows)).to(torch.bfloat16)
    x[0, 3] = 40.0   # an outlier: only its own row's scale grows
    return x


@pytest.mark.parametrize("rows, k, n", [(1, 4096, 6144), (37, 14336, 4096), (129, 4096, 28672), (4096, 4096, 1024)])
def test_scaled_mm_equals_the_dequantized_matmul(rows, k, n):
    layer, x = fp8_layer(k, n, rows), activations(rows, k)
    out = torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out.copy_(fp8.scaled_linear(x, layer.weight, layer.weight_scale, None, w8a16_rows=0))
    assert not out.isnan().any()
    w = fp8.dequantize(layer.weight, layer.weight_scale, torch.float32)
    xq, xs = torch_quantize(x)
    assert rel(out, (xq.float() * xs) @ w.t()) < 1e-2
    assert rel(out, x.float() @ w.t()) < 5e-2
    if rows > fp8.W8A16_ROWS:   # what the layer runs at this size
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("rows, k, n", [(1, 4096, 6144), (7, 14336, 4096), (64, 4096, 28672), (128, 576, 960),
                                        (100, 8192, 1024)])
def test_the_weight_only_kernel_of_decode_batches_equals_the_dequantized_matmul(rows, k, n):
    from neo_gpu_worker.kernels.fp8_quant import w8a16_matmul

    layer, x = fp8_layer(k, n, rows), activations(rows, k)
    out = torch.full((rows, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out.copy_(w8a16_matmul(x, layer.weight, layer.weight_scale))   # activations unquantized
    assert not out.isnan().any()
    w = fp8.dequantize(layer.weight, layer.weight_scale, torch.float32)
    assert rel(out, x.float() @ w.t()) < 1e-2
    if rows <= fp8.W8A16_ROWS:   # what the layer runs at this size
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("rows, k", [(1, 576), (200, 4096), (3, 14336), (5, 8200)])
def test_the_triton_row_quantizer_equals_its_torch_twin(rows, k):
    from neo_gpu_worker.kernels.fp8_quant import quantize_rows_fp8

    x = (torch.randn(rows, k, device=DEVICE) * 3).to(torch.bfloat16)
    q, s = quantize_rows_fp8(x)
    q_ref, s_ref = torch_quantize(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert (q.float() == q_ref.float()).float().mean() > 0.999


@pytest.fixture(scope="module")
def fp8_runner():
    g = dataclasses.replace(lookup("smollm2-135m"), num_layers=2, quantization="fp8")
    ops.configure("auto", DEVICE)
    try:
        model = build_model(g, MAX_LEN, DEVICE, torch.bfloat16)
        model.init_random(0)
        assert model.layers[0].mlp.gate_up_proj.scaled_mm
        r = ModelRunner(model, BLOCKS, BS, DEVICE, torch.bfloat16, graph_max_batch=24, max_model_len=MAX_LEN)
        r.kv_cache.normal_(generator=torch.Generator(DEVICE).manual_seed(1))
        yield r
    finally:
        ops.configure("torch", DEVICE)


@pytest.mark.parametrize("ctx", [[5], [3, 40, 17], [100, 1, 63, 64, 65, 30, 7, 200, 15, 16, 33, 50, 90]])
@torch.inference_mode()
def test_cuda_graph_replays_of_an_fp8_model_equal_its_eager_forward(fp8_runner, ctx):
    from test_cuda_graph import decode_plan

    plan = decode_plan(ctx, len(ctx))
    assert fp8_runner.graphs.can_run(plan)
    before = fp8_runner.kv_cache.clone()
    sb = build_sub_batch(plan, np.arange(plan.batch_size), BS, DEVICE, 0)
    want = fp8_runner.model(sb.input_ids, sb.positions, fp8_runner.kv_cache, sb.meta)
    fp8_runner.kv_cache.copy_(before)
    torch.testing.assert_close(fp8_runner.graphs.run(plan), want, atol=3e-2, rtol=3e-2)


def test_an_fp8_checkpoint_on_the_gpu_matches_transformers_on_its_dequantized_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from support.random_model import fp8_hf_folders
    from test_fp8_checkpoints import FP8_TOL, llama_config

    folder, dequantized = fp8_hf_folders(tmp_path, llama_config(), "ct-channel")
    ops.configure("auto", DEVICE)
    try:
        model = load_model(ModelSource("hf", folder, "fp8"), 64, DEVICE, torch.bfloat16)
        assert model.layers[0].self_attn.qkv_proj.scaled_mm
        ref = transformers.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).to(DEVICE).eval()
        tokens = torch.tensor([5, 17, 300, 42, 7, 99, 64, 3, 12, 80, 33, 401], device=DEVICE)
        runner = ModelRunner(model, 8, BS, DEVICE, torch.bfloat16)
        from support.equivalence import last_logits

        with torch.no_grad():
            want = ref(tokens[None]).logits[0, -1]
        got = last_logits(runner, tokens.tolist())
    finally:
        ops.configure("torch", DEVICE)
    assert rel(got, want) < FP8_TOL
