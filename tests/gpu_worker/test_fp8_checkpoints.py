"""FP8 weights on the CPU device: the dequantizing twin, FP8 checkpoints in the Hub's layouts, and
``--quantization fp8``.

- The twin equals a reference dequantize-then-matmul.
- A random tiny Llama, quantized and written by the test (``support.random_model.fp8_hf_folders``:
  safetensors with float8_e4m3fn weights and their scales) in the plain ``fp8`` layout (per-tensor
  scales, a static input scale) and compressed-tensors' ``float-quantized`` (per-channel scales),
  loads, and its greedy tokens over 32 steps (chunked prefill, paged decode) equal those of
  ``transformers`` running the same model dequantized to fp32; logits within 1e-3.
- Block-scaled checkpoints (HF's fine-grained FP8) are quantized again per channel: within the FP8
  tolerance of the dequantized model.
- ``--quantization fp8`` of a high-precision model: logits within ``FP8_TOL`` (relative L2 error)
  of the unquantized model (one e4m3 rounding per weight: at most 2**-4 of each row's largest
  weight), the argmax equal on at least ``FP8_ARGMAX`` of the positions.
- Tensor parallelism (2 gloo ranks, per-tensor scales fused into qkv/gate_up and sharded) and the
  pipelined offload forward each equal the FP8 model run whole and flat.
- Bad input: a missing scale, a scale of the wrong shape, FP8 data without a quantization_config
  and an unknown method are start-up errors naming the tensor or the method.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neo_common.config import ModelConfig
from neo_common.geometry import GEOMETRIES, Quantization
from neo_common.model_source import ModelSource, read_geometry, resolve
from neo_common.protocol import Place
from neo_common.settings import ConfigError
from neo_common.tensor_parallel import Shard
from neo_common.segment import SegmentLayout
from neo_common.cost_model import CostKey
from neo_gpu_worker import fp8
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.loader import load_model
from neo_gpu_worker.model import _apply
from neo_gpu_worker.model_runner import ModelRunner
from neo_gpu_worker.parallel import TensorParallel
from support.equivalence import DEVICE, check_equivalent, prefill_hidden, runner_for
from support.random_model import fp8_hf_folders, random_hf_folder
from support.ranks import run_gloo_ranks

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
TOKENS = [5, 17, 300, 42, 7, 99, 64, 3, 12, 80]
BS = 16
# The FP8 tolerance: the logits' relative L2 error ||fp8 - exact|| / ||exact|| after one e4m3
# rounding of every dense weight (per output channel). Measured 0.07 on the random Llama below, whose
# random weights make it far more sensitive than a trained model; the argmax must agree on most
# positions.
FP8_TOL = 0.1
FP8_ARGMAX = 0.7


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def llama_config(**changes):
    # GQA (4 query heads over 2 KV heads), an untied LM head; widths multiples of 16 (the GEMM's
    # and the block layout's granularity)
    fields = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaConfig(**(fields | changes))


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab, size=n).tolist() for n in (40, 23, 5)]


def prefill_logits(model) -> torch.Tensor:
    hidden = prefill_hidden(model, TOKENS, BS)
    with torch.inference_mode():
        return model.compute_logits(hidden)


# -- the twin ---------------------------------------------------------------------------------
def test_the_twin_equals_a_reference_dequantize_then_matmul():
    torch.manual_seed(0)
    w, bias = torch.randn(96, 64) * 0.05, torch.randn(96)
    layer = fp8.Fp8Linear(64, 96, torch.nn.Parameter(bias))
    layer.set_weight(w)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (96,)
    # the reference: per-row scale = amax / 448, e4m3 rounding, times the scale, then an fp32 matmul
    scale = w.abs().amax(1) / 448.0
    reference_w = (w / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    for rows in (1, 7, 33):   # below and above the CPU device's batch-invariance padding
        x = torch.randn(rows, 64)
        torch.testing.assert_close(_apply(layer, x), F.linear(x, reference_w, bias), rtol=1e-6, atol=1e-6)
    assert (reference_w - w).abs().max() <= (w.abs().amax(1, keepdim=True) / 16).max()   # e4m3: 3 mantissa bits


# -- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fp8-tensor", "ct-channel"])
def test_an_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tmp_path, layout):
    config = llama_config()
    folder, dequantized = fp8_hf_folders(tmp_path, config, layout)
    source = ModelSource("hf", folder, "fp8")
    assert read_geometry(source).quantization == Quantization.FP8
    runner = runner_for(source, config.max_position_embeddings)
    layer = runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, fp8.Fp8Linear) and isinstance(layer.mlp.down_proj, fp8.Fp8Linear)
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(runner.model.lm_head, fp8.Fp8Linear)   # embeddings and the LM head stay high precision
    ref = transformers.AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).to(DEVICE).eval()
    check_equivalent(runner, ref, prompts(config.vocab_size), atol=1e-3)


def test_a_block_scaled_checkpoint_loads_within_the_fp8_tolerance(tmp_path):
    config = llama_config()
    folder, dequantized = fp8_hf_folders(tmp_path, config, "fp8-block")
    got = prefill_logits(load_model(ModelSource("hf", folder, "b"), 64, CPU, torch.float32))
    want = prefill_logits(load_model(ModelSource("hf", dequantized, "d"), 64, CPU, torch.float32))
    assert 0 < relative_error(got, want) <= FP8_TOL   # a second rounding: per block, then per row
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= FP8_ARGMAX


def test_quantization_fp8_keeps_logits_within_the_fp8_tolerance(tmp_path):
    folder = random_hf_folder(tmp_path, llama_config())
    full = load_model(ModelSource("hf", folder, "m"), 64, CPU, torch.float32)
    quant = load_model(ModelSource("hf", folder, "m", quantization="fp8"), 64, CPU, torch.float32)
    assert quant.geometry.quantization == "fp8" and full.geometry.quantization == "none"
    want, got = prefill_logits(full), prefill_logits(quant)
    assert 0 < relative_error(got, want) <= FP8_TOL, f"relative logit error {relative_error(got, want):.4f}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= FP8_ARGMAX


def test_fp8_weight_bytes_feed_sizing_and_the_cost_key():
    cfg = ModelConfig(model="llama-3-8b", load_format="dummy", quantization="fp8")
    g = read_geometry(resolve(cfg))
    bf16 = GEOMETRIES["llama-3-8b"]
    assert g.quantization == "fp8" and bf16.quantization == "none"
    # dense layers at 1 byte (+ a float32 scale per row): 15.0 GiB -> 8.5 GiB for Llama-3-8B
    assert round(bf16.weight_bytes(2) / 2**30, 1) == 15.0 and round(g.weight_bytes(2) / 2**30, 1) == 8.5
    key = CostKey.from_geometry(g, "H200", "bfloat16", 16, 8, "triton+graphs")
    plain = CostKey.from_geometry(bf16, "H200", "bfloat16", 16, 8, "triton+graphs")
    assert key != plain and key.filename() != plain.filename()
    assert key.differences(plain) == ["quantization: file 'fp8' != wanted 'none'"]
    assert CostKey.from_dict(key.to_dict()) == key
    # a profile written before the field existed is an unquantized one
    assert CostKey.from_dict({k: v for k, v in plain.to_dict().items() if k != "quantization"}) == plain


def test_the_loaded_bytes_are_what_the_geometry_counts():
    model = load_model(ModelSource("dummy", "smollm2-135m", "s", quantization="fp8"), 64, CPU, torch.float32)
    g = model.geometry
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == g.weight_bytes(4)
    saved = dataclasses.replace(g, quantization="none").weight_bytes(4) - g.weight_bytes(4)
    assert saved == 3 * g.dense_parameters() - 4 * g.dense_output_channels()   # 4 -> 1 byte, plus the scales


def test_the_profiler_times_fp8_layers_for_an_fp8_model():
    """The cost tables of an FP8 model must time the matmuls the worker runs (and are keyed apart)."""
    from neo_gpu_worker.profiler import _Bench

    g = dataclasses.replace(GEOMETRIES["smollm2-135m"], num_layers=1, quantization="fp8")
    bench = _Bench(g, CPU, torch.float32, BS, layers=1, max_tokens=32)
    layer = bench.layers[0]
    assert isinstance(layer.mlp.down_proj, fp8.Fp8Linear) and layer.mlp.down_proj.weight_scale.min() > 0
    with torch.inference_mode():
        out = bench.linr(8)()[0]
    assert out.shape == (8, g.hidden_size) and torch.isfinite(out).all()


# -- tensor parallelism and the pipeline --------------------------------------------------------
def rank_main(folder: str, rank: int, world: int, init_method: str, out) -> None:
    torch.set_num_threads(1)
    source = ModelSource("hf", folder, "fp8")
    tp = TensorParallel(Shard.of(read_geometry(source), rank, world), CPU)
    tp.init_group(init_method, 120.0)
    try:
        model = load_model(source, 64, CPU, torch.float32, tp=tp)
        out.put((rank, model.layers[0].self_attn.qkv_proj.weight_scale.numel(), prefill_logits(model).numpy()))
    finally:
        tp.close()


@pytest.mark.timeout(180)
def test_fp8_over_two_gloo_ranks_equals_the_whole_model(tmp_path):
    # per-tensor scales: q, k and v (gate and up) keep their own scales inside the fused, sharded rows
    folder, _ = fp8_hf_folders(tmp_path, llama_config(), "fp8-tensor")
    expected = prefill_logits(load_model(ModelSource("hf", folder, "fp8"), 64, CPU, torch.float32))
    results, exitcodes = run_gloo_ranks(rank_main, folder)
    assert [r[1] for r in results] == [128, 128], "each rank's qkv rows: 2 q heads + 1 k + 1 v of 32"
    for _, _, logits in results:
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    assert exitcodes == [0, 0]


@torch.inference_mode()
def test_the_pipelined_forward_of_an_fp8_model_equals_its_flat_forward(tmp_path):
    from test_model_parallel_paths import _plan

    folder, _ = fp8_hf_folders(tmp_path, llama_config(), "ct-channel")
    model = load_model(ModelSource("hf", folder, "fp8"), 256, CPU, torch.float32)
    host = HostKv(f"neo-test-fp8-pipeline-{os.getpid()}", SegmentLayout.for_model(model.geometry, 16, BS, 16, "bfloat16"))
    try:
        piped = ModelRunner(model, 32, BS, CPU, torch.bfloat16, host, staging_blocks=8)
        rows = [(0, Place.CPU, 20), (0, Place.GPU, 9), (1, Place.GPU, 12), (1, Place.GPU, 5)]
        tables = [[3, 7], [5], [9], [2]]
        hidden, order = piped.pipeline.forward(_plan(rows, tables))
        got = model.compute_logits(hidden)[np.argsort(order)]
        flat = ModelRunner(model, 32, BS, CPU, torch.bfloat16)
        whole = _plan([(0, Place.GPU, r[2]) for r in rows], tables)
        sb = build_sub_batch(whole, np.arange(whole.batch_size), BS, CPU, 0)
        want = model.compute_logits(model(sb.input_ids, sb.positions, flat.kv_cache, sb.meta)[sb.last_token])
    finally:
        host.close()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# -- bad input --------------------------------------------------------------------------------
def _rewrite(folder: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_a_missing_scale_is_an_error_naming_the_weight(tmp_path):
    folder, _ = fp8_hf_folders(tmp_path, llama_config(), "ct-channel")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(ConfigError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' is FP8 but its scale"):
        load_model(ModelSource("hf", folder, "fp8"), 64, CPU, torch.float32)


def test_a_scale_of_the_wrong_shape_is_an_error_naming_it(tmp_path):
    folder, _ = fp8_hf_folders(tmp_path, llama_config(), "ct-channel")
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_scale": torch.ones(7, 1)}))
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight_scale': shape \(7, 1\)"):
        load_model(ModelSource("hf", folder, "fp8"), 64, CPU, torch.float32)


def test_fp8_data_without_a_quantization_config_is_an_error_naming_the_tensor(tmp_path):
    folder, _ = fp8_hf_folders(tmp_path, llama_config(), "fp8-tensor")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    del config["quantization_config"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    for quantization in ("none", "fp8"):   # never cast without its scale, nor paired with a guessed one
        with pytest.raises(ConfigError, match=r"'model\.layers\.0\.[\w.]+' is FP8 data or a scale"):
            load_model(ModelSource("hf", folder, "fp8", quantization=quantization), 64, CPU, torch.float32)


@pytest.mark.parametrize("quant, named", [
    ({"quant_method": "awq", "bits": 4}, "method 'awq' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}}, "group 'g': weights 4-bit float"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
])
def test_an_unsupported_quantization_is_refused_naming_it(tmp_path, quant, named):
    folder = random_hf_folder(tmp_path, llama_config())
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quant
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError, match=named):
        read_geometry(ModelSource("hf", folder, "q"))
