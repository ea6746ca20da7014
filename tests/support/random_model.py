"""Hugging Face folders of small models with random weights, for tests that need a real checkpoint."""

from __future__ import annotations

import os


def random_hf_folder(parent: str, config) -> str:
    """Save a ``transformers`` model of ``config`` with seeded random weights under ``parent``.

    Weights are larger than the init default (logits far from uniform, like a trained model's), norm
    weights non-unit (a norm applied to the wrong tensor shows), biases non-zero.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
    folder = os.path.join(str(parent), config.model_type)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# llama.cpp's tensor names for the Hugging Face ones (convert_hf_to_gguf.py's table, written out here
# so the test does not borrow the loader's own inverse of it).
_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for a ``rope_type: llama3`` config
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors): per pair, the divisor of its
    inverse frequency."""
    import math

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def gguf_from_hf(folder: str, arch: str, rope_factors: list[float] | None = None) -> str:
    """Write the HF checkpoint in ``folder`` as an F32 GGUF with the ``gguf`` package, the way
    llama.cpp's converter lays it out: its metadata keys, its tensor names, q/k rows interleaved for
    the "normal" RoPE of ``llama``/``mistral`` (rotate-half NeoX RoPE of qwen2/qwen3 stays as is),
    and ``rope_freqs.weight`` when given. Returns the file's path."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rope = c.get("rope_parameters") or {}
    path = os.path.join(folder, f"model-{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.get("rope_theta", rope.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_vocab_size(c["vocab_size"])

    def permute(t: np.ndarray, n: int) -> np.ndarray:   # llama.cpp's LlamaModel.permute
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    interleave = arch in ("llama", "mistral")
    for name, t in sorted(load_file(os.path.join(folder, "model.safetensors")).items()):
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            out = f"blk.{idx}.{_GGUF_NAMES[module]}.{suffix}"
            if interleave and module == "self_attn.q_proj":
                t = permute(t, heads)
            elif interleave and module == "self_attn.k_proj":
                t = permute(t, kv_heads)
        w.add_tensor(out, np.ascontiguousarray(t, dtype=np.float32))
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- FP8 checkpoints, as the Hub's tools lay them out -------------------------------------------
_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_MAX = 448.0


def fp8_hf_folders(parent: str, config, layout: str) -> tuple[str, str]:
    """An FP8 checkpoint of the random ``transformers`` model of ``config``, and the same model
    dequantized (fp32, a plain HF folder: what ``transformers`` loads as the reference).

    ``layout``: ``fp8-tensor`` (``quant_method: fp8``, one ``weight_scale`` per tensor and a static
    ``input_scale``, as vLLM's and llm-compressor's early FP8 checkpoints), ``ct-channel``
    (compressed-tensors ``float-quantized``, ``weight_scale [out, 1]``, dynamic per-token input,
    ``ignore: [lm_head]``), or ``fp8-block`` (HF's fine-grained FP8: ``weight_scale_inv`` per
    16x16 block, ``weight_block_size``). The quantization is written out here, not borrowed from the
    engine. Returns (fp8 folder, dequantized folder)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = random_hf_folder(parent, config)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix != "weight" or module.rpartition(".")[2] not in _DENSE:
            quantized[name] = dequantized[name] = w
            continue
        w = w.float()
        if layout == "fp8-tensor":
            scale = w.abs().max() / E4M3_MAX
            q = (w / scale).to(torch.float8_e4m3fn)
            quantized[module + ".weight_scale"] = scale.reshape(())
            quantized[module + ".input_scale"] = torch.tensor(0.05)
            deq = q.float() * scale
        elif layout == "ct-channel":
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
            q = (w / scale).to(torch.float8_e4m3fn)
            quantized[module + ".weight_scale"] = scale.to(torch.bfloat16)   # as llm-compressor saves them
            deq = q.float() * scale.to(torch.bfloat16).float()
        elif layout == "fp8-block":
            rows, cols = w.shape
            blocks = w.reshape(rows // 16, 16, cols // 16, 16)
            scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
            q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            quantized[module + ".weight_scale_inv"] = scale
            deq = (q.float() * scale[:, None, :, None]).reshape(rows, cols)
            q = q.reshape(rows, cols)
        else:
            raise ValueError(layout)
        quantized[name] = q
        dequantized[name] = deq
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    folders = []
    for kind, data in (("fp8", quantized), ("dequantized", dequantized)):
        out = os.path.join(str(parent), f"{config.model_type}-{layout}-{kind}")
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file({k: v.contiguous() for k, v in data.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
        if kind == "fp8":
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(dict(cfg, quantization_config=_quantization_config(layout)), f)
        folders.append(out)
    return folders[0], folders[1]


def _quantization_config(layout: str) -> dict:
    if layout == "fp8-tensor":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    if layout == "fp8-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                      "dynamic": True}}}}
