"""Every architecture of the registry against Hugging Face ``transformers`` (the reference only):
a randomly initialised tiny model of each family, created here, runs through our ``ModelRunner``
with chunked prefill and batched paged decode over scattered blocks; greedy tokens must equal
transformers' over 32 new tokens and the last prompt token's logits must agree within 1e-3.
Llama (3.1 RoPE scaling) and Qwen2 are in ``test_model_equivalence.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from neo_common.geometry import Architecture, lookup
from neo_common.model_source import ModelSource, read_geometry
from neo_common.settings import ConfigError
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.models import REGISTRY, cpu_attention_supports
from neo_gpu_worker.pipeline import PipelinedExecutor
from support.equivalence import compare_random
from support.random_model import random_hf_folder

transformers = pytest.importorskip("transformers")


def mistral_config():
    # Mistral v0.1's shape of config: a 4096-token sliding window over a longer trained context
    return transformers.MistralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, sliding_window=4096, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def qwen3_config():
    # head_dim 64 with 4 heads over hidden 128: q/k/v widths that hidden // heads would get wrong
    return transformers.Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def gemma2_config():
    # Soft-caps far below the released 50/30, so that with these random weights they change the scores and
    # logits a lot; query_pre_attn_scalar unlike head_dim, so a head_dim scale shows.
    return transformers.Gemma2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, sliding_window=4096,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager")


def test_mistral_matches_transformers(tmp_path):
    compare_random(tmp_path, mistral_config(), prompt_len=70)


def test_qwen3_qk_norm_matches_transformers(tmp_path):
    compare_random(tmp_path, qwen3_config(), prompt_len=70)


def test_gemma2_matches_transformers(tmp_path):
    compare_random(tmp_path, gemma2_config(), prompt_len=70)


def test_sliding_window_models_serve_contexts_within_the_window(tmp_path):
    g = read_geometry(ModelSource("hf", random_hf_folder(tmp_path, mistral_config()), "m"))
    assert (g.architecture, g.sliding_window, g.max_position_embeddings) == ("MistralForCausalLM", 4096, 4096)
    g = read_geometry(ModelSource("hf", random_hf_folder(tmp_path, gemma2_config()), "g"))
    assert (g.sliding_window, g.max_position_embeddings, g.attn_scale) == (4096, 4096, 24 ** -0.5)
    # Qwen's configs name a window that only use_sliding_window turns on
    g = read_geometry(ModelSource("hf", random_hf_folder(tmp_path, qwen3_config()), "q"))
    assert (g.sliding_window, g.max_position_embeddings, g.qk_norm, g.qkv_bias) == (None, 1024, True, False)


def test_an_unsupported_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path):
    folder = random_hf_folder(tmp_path, mistral_config())
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["FalconForCausalLM"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError) as err:
        read_geometry(ModelSource("hf", folder, "falcon"))
    assert "'FalconForCausalLM'" in str(err.value)
    assert all(a.value in str(err.value) for a in Architecture)


def test_a_quantized_checkpoint_is_refused_naming_its_method(tmp_path):
    folder = random_hf_folder(tmp_path, qwen3_config())
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}   # FP8 ones load: test_fp8_checkpoints.py
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError, match="method 'gptq' is not supported"):
        read_geometry(ModelSource("hf", folder, "q"))


def test_the_registry_builds_every_architecture_the_geometry_accepts():
    assert set(REGISTRY) == set(Architecture)
    g = dataclasses.replace(lookup("smollm2-135m"), architecture="GPT2LMHeadModel")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        build_model(g, 64, torch.device("cpu"), torch.float32)


def test_the_pipeline_refuses_a_model_its_cpu_kernel_cannot_compute():
    """Gemma-2's soft-capped attention is not in the cpu_attention kernel: offloading it is refused
    at start rather than served wrong."""
    g = lookup("gemma-2-9b")
    assert not cpu_attention_supports(g) and cpu_attention_supports(lookup("qwen3-8b"))
    tiny = dataclasses.replace(g, num_layers=1, vocab_size=256, hidden_size=64, intermediate_size=64,
                               num_heads=2, num_kv_heads=1, head_dim=32)
    model = build_model(tiny, 64, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="--offload-mode off"):
        PipelinedExecutor(model, torch.zeros(1), None, 16, 1, torch.device("cpu"), 1.0)
