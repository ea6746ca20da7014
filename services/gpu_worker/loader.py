"""Build the model on its device and fill it from an HF folder, a GGUF file, or random (dummy)."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Iterator

import numpy as np
import torch

from neo_common.geometry import Architecture, ModelGeometry, Quantization
from neo_common.gguf_file import GGUFFile, open_gguf
from neo_common.model_source import Fp8Checkpoint, ModelSource, checkpoint_fp8, read_geometry
from neo_gpu_worker import fp8, quant_dense
from neo_gpu_worker.dequant import dequantize
from neo_gpu_worker.models.protocol import CausalLM
from neo_gpu_worker.models import model_class
from neo_gpu_worker.parallel import TensorParallel

log = logging.getLogger(__name__)

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                      "output.weight": "lm_head.weight"}


def build_model(geometry: ModelGeometry, max_positions: int, device: torch.device, dtype: torch.dtype,
                tp: TensorParallel | None = None, fp8_layout: Fp8Checkpoint | None = None) -> CausalLM:
    """Allocate the model (this rank's shard of it; its family from the registry) straight on its
    device (no host copy of a 70B model first). With FP8 quantization the dense layers are
    ``fp8.Fp8Linear`` (``fp8_layout``: the checkpoint's, None to quantize what loads)."""
    cls = model_class(geometry)
    quantized = geometry.quantization == Quantization.FP8
    if quantized:
        fp8.check_device(device)
    with torch.device("meta"):
        model = cls(geometry, tp.shard if tp else None, tp)
    model = model.to(dtype=dtype)
    if quantized:   # after the cast, which would turn float8 parameters into `dtype`
        fp8.quantize_modules(model)
        model.fp8, model.fp8_layout = True, fp8_layout
    model = model.to_empty(device=device)
    fp8.prepare(model, device, dtype)
    model.setup_rope(max_positions, device)
    return model.eval()


def load_model(source: ModelSource, max_positions: int, device: torch.device, dtype: torch.dtype,
               seed: int = 0, tp: TensorParallel | None = None, gguf_blocks: bool = True) -> CausalLM:
    """The model of ``source`` on ``device``. A GGUF file's dense layers keep their blocks on the
    CPU device in float32 (``quant_dense``: no float32 copy of those weights) unless ``gguf_blocks``
    is False (GPU emulation times the float32 model); elsewhere GGUF is dequantized on load."""
    geometry = read_geometry(source)
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        has_output = any(t.name == "output.weight" for t in reader.tensors)
        geometry = dataclasses.replace(geometry, tie_word_embeddings=not has_output)
        model = build_model(geometry, max_positions, device, dtype, tp)
        keep = gguf_blocks and device.type == "cpu" and dtype == torch.float32 and not model.fp8
        if keep and not quant_dense.available():
            log.info("neo_gpu_worker._quant_dense is not built (no compiler at install?): the GGUF weights "
                     "are dequantized to float32 and run through the float32 dense path")
        model.load_weights(_gguf_tensors(reader, geometry, keep and quant_dense.available()))
    elif source.kind == "hf":
        model = build_model(geometry, max_positions, device, dtype, tp, checkpoint_fp8(source))
        model.load_weights(_safetensors(source.path, device))
    else:
        model = build_model(geometry, max_positions, device, dtype, tp)
        model.init_random(seed)
    if device.type == "cuda":
        # the high-precision tensors quantized on the way in stay reserved by the caching allocator
        # otherwise, and the KV pool is sized from the memory free after the load
        torch.cuda.empty_cache()
    shard = model.shard
    log.info("loaded %s (%s, %.1fM params%s) on %s as %s%s: %.2f GiB of weights", source.served_name, source.kind,
             geometry.num_parameters() / 1e6,
             f"; rank {shard.rank} of {shard.world}: KV heads {shard.kv_heads}" if shard.world > 1 else "",
             device, dtype, " with FP8 dense layers" if model.fp8 else "", fp8.weight_bytes(model) / 2**30)
    return model


def _safetensors(folder: str, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion of q/k rows from rotate-half order to interleaved pairs."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(reader: GGUFFile, g: ModelGeometry, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF-named tensors of a GGUF file, dequantized to float32; with ``keep_blocks`` a tensor in
    a format ``quant_dense`` reads also carries its raw blocks (``tensor.gguf_blocks``, rows in the
    same order) for ``load_weights`` to keep."""
    from gguf import GGMLQuantizationType

    # llama.cpp interleaves q/k rows for its "normal" RoPE (llama, mistral); Qwen's NeoX-style RoPE
    # is rotate-half already, so their rows are stored as in the HF checkpoint.
    permuted = g.architecture in (Architecture.LLAMA, Architecture.MISTRAL)
    for t in reader.tensors:
        if t.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[t.name]
        elif t.name.startswith("blk."):
            _, idx, kind, suffix = t.name.split(".", 3)
            if kind not in _GGUF_LAYER_NAMES:
                raise KeyError(f"GGUF tensor {t.name!r} is not understood")
            name = f"layers.{idx}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
        elif t.name == "rope_freqs.weight":
            continue  # Llama-3.1's frequency divisors: read into the geometry's rope_scaling (model_source)
        else:
            raise KeyError(f"GGUF tensor {t.name!r} is not understood")
        raw = reader.tensor_data(t)
        blocks = None
        if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(raw)
        else:
            data = dequantize(raw, t.qtype, t.shape)
            if keep_blocks and name.endswith("weight"):
                blocks = quant_dense.QuantBlocks.from_gguf(raw, t.qtype, t.shape)
        data = data.astype(np.float32)
        heads = None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = g.num_heads
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = g.num_kv_heads
        if heads is not None:
            data = unpermute_rope_rows(data, heads)
            if blocks is not None:   # whole rows move: a row's blocks move with it
                blocks = dataclasses.replace(blocks, data=torch.from_numpy(
                    np.ascontiguousarray(unpermute_rope_rows(blocks.data.numpy(), heads))))
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        if blocks is not None:
            tensor.gguf_blocks = blocks
        yield name, tensor
