"""GGUF files written by the ``gguf`` package, laid out as llama.cpp's converter lays them out, against
the Hugging Face checkpoint they were written from (``transformers`` as the reference).

Llama-3.1: the GGUF carries no rope_scaling parameters, only ``rope_freqs.weight``, the per-pair
divisors of the inverse frequencies that llama.cpp computes from ``rope_type: llama3``. Transformers'
own GGUF loader drops that tensor (its llama config mapping has no rope-scaling keys, so it builds a
model with plain RoPE), so the reference is transformers' model of the HF folder with the
equivalent ``rope_scaling`` config: our load of the GGUF must match it. With prompts of 300 tokens
past the original 256-token context, plain RoPE gives other tokens. Qwen2 (QKV bias), Qwen3 (q/k
norm, explicit head_dim) and Mistral files are checked the same way: their q/k rows are stored
un-interleaved for Qwen's NeoX RoPE and interleaved for Mistral's.
"""

from __future__ import annotations

import pytest

from neo_common.model_source import ModelSource, read_geometry
from support.equivalence import compare_random
from support.random_model import gguf_from_hf, llama3_rope_factors

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256}


def _gguf(arch: str, rope_factors=None):
    return lambda folder: ModelSource("gguf", gguf_from_hf(folder, arch, rope_factors), "random")


def test_llama31_gguf_rope_freqs_match_transformers(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    factors = llama3_rope_factors(64, 500000.0, LLAMA3_SCALING)
    assert min(factors) == 1.0 and max(factors) == 8.0, "the file must scale some pairs, not all or none"
    convert = _gguf("llama", factors)
    compare_random(tmp_path, config, prompt_len=300, convert=convert)
    g = read_geometry(convert(str(tmp_path / "llama")))
    assert g.rope_scaling["rope_type"] == "freq_factors" and len(g.rope_scaling["factors"]) == 32


def test_qwen2_gguf_matches_transformers(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    compare_random(tmp_path, config, prompt_len=40, convert=_gguf("qwen2"))


def test_qwen3_gguf_matches_transformers(tmp_path):
    config = transformers.Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rope_theta=1000000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    compare_random(tmp_path, config, prompt_len=40, convert=_gguf("qwen3"))


def test_mistral_gguf_matches_transformers(tmp_path):
    config = transformers.MistralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    compare_random(tmp_path, config, prompt_len=40, convert=_gguf("mistral"))
