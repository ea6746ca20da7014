"""Our model over the paged KV pool vs Hugging Face `transformers` (reference only), token for token.

Covers the real SmolLM2 GGUF (dequantized by both sides independently), a random tiny Llama-3.1
geometry with rope scaling and untied embeddings (head_dim 128), and a random Qwen2 geometry with
QKV bias (head_dim 64). Several prompts run batched, with scattered block tables, through prefill
in chunks and batched decode (``support.equivalence``). Runs on CUDA too when present (the GPU run
in docs/benchmarks). The other families: ``test_model_families.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from neo_common.config import ModelConfig
from neo_common.model_source import embedded_gguf_path, resolve
from neo_gpu_worker.loader import load_model
from neo_gpu_worker.model_runner import ModelRunner
from support.equivalence import BLOCK, DEVICE, check_equivalent, compare_random

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def smollm2():
    path = embedded_gguf_path()
    folder, name = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(DEVICE)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = load_model(resolve(ModelConfig()), 1024, DEVICE, torch.float32)
    return ModelRunner(model, 64, BLOCK, DEVICE, torch.float32), ref.eval(), tok


def test_smollm2_gguf_matches_transformers(smollm2):
    runner, ref, tok = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):",
               "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
               "Once upon a time, in a small village by the sea, there lived"]
    check_equivalent(runner, ref, [tok(p)["input_ids"] for p in prompts], atol=2e-3)


def test_random_llama31_rope_scaling_matches_transformers(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=4096, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    compare_random(tmp_path, config, prompt_len=300)


def test_random_qwen2_qkv_bias_matches_transformers(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    compare_random(tmp_path, config, prompt_len=70)
