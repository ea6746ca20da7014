"""The transformers peer comparison: its config mapping, and main() end to end on the CPU with a tiny geometry."""

from __future__ import annotations

import json

import pytest

from neo_bench.peer_transformers import llama_config, main, make_prompts, parse_args, serve_argv
from neo_common.geometry import lookup

pytestmark = pytest.mark.integration


def test_llama_config_has_the_geometry_shapes():
    g = lookup("llama-3.1-8b")
    c = llama_config(g)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (4096, 32, 32, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (14336, 128256, 131072)
    assert not c.tie_word_embeddings and c.rms_norm_eps == 1e-5
    rope = getattr(c, "rope_parameters", None) or {**(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert llama_config(lookup("smollm2-135m")).tie_word_embeddings


def test_prompts_have_the_exact_length_and_serve_flags_pass_through():
    prompts = make_prompts(3, 17, 49152, seed=1)
    assert len(prompts) == 3 and {len(p) for p in prompts} == {17} and max(map(max, prompts)) < 32000
    args = parse_args(["--device", "cpu", "--serve-args", "--worker-addr tcp://127.0.0.1:7001 --cpu-threads 1"])
    assert args.dtype == "float32" and args.batches == [1, 8, 32, 64]
    argv = serve_argv(args, 8)
    assert argv[argv.index("--max-num-seqs") + 1] == "8" and argv.count("--worker-addr") == 1
    assert "--cpu-attention-addr" in argv and argv[-2:] == ["--cpu-threads", "1"] and "--tokenizer" not in argv


def test_main_end_to_end_on_the_cpu(tmp_path):
    code = main(["--model", "smollm2-135m", "--load-format", "dummy", "--device", "cpu", "--batches", "1,2",
                 "--input-len", "16", "--output-len", "4", "--warmup-tokens", "2",
                 "--serve-args", "--num-gpu-blocks 64 --max-model-len 256", "--ready-timeout", "120",
                 "--out", str(tmp_path)])
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("serve_peer_b*.log"))
    assert code == 0, logs
    report = json.loads((tmp_path / "peer_transformers_smollm2-135m.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for r in report["rows"]:
        assert r["hf_tok_s"] > 0 and r["neo_tok_s"] > 0 and r["ratio"] == pytest.approx(r["neo_tok_s"] / r["hf_tok_s"])
        assert r["hf_ttft_s"] > 0 and r["neo_ttft_s"] > 0
        assert r["hf"]["output_tokens"] == r["neo"]["output_tokens"] == 4 * r["batch"]
        assert r["neo"]["serve_args"][r["neo"]["serve_args"].index("--max-num-seqs") + 1] == str(r["batch"])
    hw = report["hardware"]
    assert hw["torch"] and hw["transformers"] and hw["torch_device"] == "cpu"
    assert report["geometry"]["name"] == "smollm2-135m"
    assert (tmp_path / "peer_transformers_smollm2-135m.png").stat().st_size > 1000
