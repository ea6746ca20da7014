"""Our model over the paged KV pool vs Hugging Face `transformers` (reference only), token for token.

Covers the real SmolLM2 GGUF (dequantized by both sides independently), a random tiny Llama-3.1
geometry with rope scaling and untied embeddings (head_dim 128), and a random Qwen2 geometry with
QKV bias (head_dim 64). Several prompts run batched, with scattered block tables, through prefill
in chunks and batched decode. Runs on CUDA too when present (the GPU run in docs/benchmarks).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from neo_common.config import ModelConfig
from neo_common.model_source import ModelSource, embedded_gguf_path, resolve
from neo_common.protocol import IterationPlan
from neo_gpu_worker.loader import load_model
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.model_runner import ModelRunner
from support.random_model import random_hf_folder

transformers = pytest.importorskip("transformers")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEW_TOKENS = 32
BLOCK = 16


def make_plan(rows: list[tuple[int, int, list[int], list[int]]]) -> IterationPlan:
    """rows: (seq_id, start_pos, tokens, block_table) -> a greedy plan sampling every row."""
    b = len(rows)
    width = max(len(r[3]) for r in rows)
    bt = np.full((b, width), -1, np.int32)
    for i, r in enumerate(rows):
        bt[i, :len(r[3])] = r[3]
    return IterationPlan(
        iteration_id=1, seq_ids=np.array([r[0] for r in rows], np.int64), places=np.zeros(b, np.uint8),
        sub_batch=np.zeros(b, np.uint8), start_pos=np.array([r[1] for r in rows], np.int32),
        num_tokens=np.array([len(r[2]) for r in rows], np.int32),
        token_ids=np.array([t for r in rows for t in r[2]], np.int32), block_tables=bt,
        sample=np.ones(b, np.uint8), temperature=np.zeros(b, np.float32), top_p=np.ones(b, np.float32),
        top_k=np.full(b, -1, np.int32), seeds=np.full(b, -1, np.int64), steps=np.zeros(b, np.int32))


def generate(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, chunk: int = 7) -> list[list[int]]:
    """Greedy: prompts prefilled in chunks of `chunk` tokens (all rows together), then batched decode."""
    rng = np.random.default_rng(0)
    max_len = max(len(p) for p in prompts) + new_tokens
    need = -(-max_len // BLOCK)
    perm = rng.permutation(runner.num_blocks)  # scattered, non-contiguous tables
    tables = [perm[i * need:(i + 1) * need].tolist() for i in range(len(prompts))]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        rows, owners = [], []
        for i, p in enumerate(prompts):
            if done[i] < len(p):
                piece = p[done[i]:done[i] + chunk]
                rows.append((i, done[i], piece, tables[i]))
                owners.append(i)
                done[i] += len(piece)
        res = runner.execute(make_plan(rows))
        for i, tok in zip(res.seq_ids.tolist(), res.token_ids.tolist()):
            if done[i] == len(prompts[i]) and not outs[i]:
                outs[i].append(tok)
    for _ in range(new_tokens - 1):
        rows = [(i, len(p) + len(outs[i]) - 1, [outs[i][-1]], tables[i]) for i, p in enumerate(prompts)]
        res = runner.execute(make_plan(rows))
        for i, tok in zip(res.seq_ids.tolist(), res.token_ids.tolist()):
            outs[i].append(tok)
    return outs


def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain argmax loop with the KV cache of `transformers` (EOS does not stop it, as in ours)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt], device=DEVICE), use_cache=True)
        first_logits = out.logits[0, -1].float()
        tokens = [int(first_logits.argmax())]
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]], device=DEVICE), past_key_values=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, first_logits


def last_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    plan = make_plan([(0, 0, prompt, list(range(-(-len(prompt) // BLOCK))))])
    sb = build_sub_batch(plan, np.arange(plan.batch_size), BLOCK, DEVICE, 0)
    with torch.inference_mode():
        hidden = runner.model(sb.input_ids, sb.positions, runner.kv_cache, sb.meta)
        return runner.model.compute_logits(hidden[sb.last_token[-1:]])[0]


def check_equivalent(ours: ModelRunner, ref, prompts: list[list[int]], atol: float) -> None:
    got = generate(ours, prompts, NEW_TOKENS)
    for prompt, tokens in zip(prompts, got):
        want, ref_logits = reference_greedy(ref, prompt, NEW_TOKENS)
        assert tokens == want, f"prompt {prompt[:8]}...: ours {tokens} vs transformers {want}"
        ours_logits = last_logits(ours, prompt)
        assert torch.allclose(ours_logits, ref_logits, atol=atol, rtol=0), \
            f"max logit difference {(ours_logits - ref_logits).abs().max().item()}"


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


def _compare_random(tmp_path, config, prompt_len: int) -> None:
    folder = random_hf_folder(tmp_path, config)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE).eval()
    source = ModelSource("hf", folder, "random")
    model = load_model(source, config.max_position_embeddings, DEVICE, torch.float32)
    runner = ModelRunner(model, 96, BLOCK, DEVICE, torch.float32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (prompt_len, prompt_len // 2 + 3, 5)]
    check_equivalent(runner, ref, prompts, atol=1e-3)


def test_random_llama31_rope_scaling_matches_transformers(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=4096, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    _compare_random(tmp_path, config, prompt_len=300)


def test_random_qwen2_qkv_bias_matches_transformers(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    _compare_random(tmp_path, config, prompt_len=70)
