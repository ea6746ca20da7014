"""benchmarks/prefix_cache.py end to end: GPU-only caching vs the host tier, two real `neo serve`
(the embedded model, offload auto, a GPU pool too small for the conversations), ABBA, two reps."""

from __future__ import annotations

import json

import pytest

from support.cost_tables import synthetic
from neo_bench.neo_vs_gpu_only import serve_args
from neo_bench.prefix_cache import main, parse_args

pytestmark = pytest.mark.integration


def test_variants_differ_by_the_cache_flag_alone():
    args = parse_args(["--num-cpu-blocks", "64", "--num-gpu-blocks", "24"])
    assert args.modes == ["off", "gpu", "host"] and args.order[:6] == ["off#0", "gpu#0", "host#0", "host#1",
                                                                     "gpu#1", "off#1"]
    argv = {v: serve_args(args, *args.variants[v]) for v in args.modes}
    assert argv["host"][-2:] == ["--offload-mode", "auto"] and "--num-cpu-blocks" in argv["host"]
    assert argv["off"][-2:] == ["--enable-prefix-caching", "false"]
    assert argv["gpu"][-2:] == ["--host-prefix-cache-fraction", "0"]
    common = {v: [x for k, x in enumerate(a) if not any(f in ("--port", "--worker-addr", "--cpu-attention-addr")
                                                       for f in a[max(0, k - 1):k + 1])] for v, a in argv.items()}
    assert common["off"][:-2] == common["gpu"][:-2] == common["host"], "one server's ports aside"
    for bad in (["--variants", "gpu,cpu"], ["--variants", "host", "--base", "gpu"], ["--reps", "0"],
                ["--num-turns", "0"], ["--variants", "gpu,gpu"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_gpu_only_caching_vs_host_tier_on_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", str(tmp_path / "cost"))
    tables = synthetic().save(str(tmp_path / "tables.json"))
    code = main(["--variants", "gpu,host", "--reps", "2", "--device", "cpu", "--num-gpu-blocks", "24",
                 "--num-cpu-blocks", "256", "--max-model-len", "1024", "--max-num-batched-tokens", "1024",
                 "--cpu-threads", "1", "--serve-arg=--kv-cache-dtype bfloat16 --calibrate-pipeline false",
                 f"--serve-arg=--cost-tables {tables}", "--num-conversations", "4", "--num-turns", "3",
                 "--system-prompt-len", "32", "--user-len", "48", "--answer-len", "4", "--think-time", "0.1",
                 "--vocab", "49152", "--warmup", "0", "--ready-timeout", "120", "--stop-grace", "20",
                 "--label", "ci", "--out", str(tmp_path)])
    assert code == 0, (tmp_path / "serve_ci_host.log").read_text()[-3000:]
    report = json.loads((tmp_path / "prefix_cache_ci.json").read_text())
    assert (tmp_path / "prefix_cache_ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["order"] == ["gpu#0", "host#0", "host#1", "gpu#1"]
    assert [(r["mode"], r["rep"]) for r in report["runs"]] == [("gpu", 0), ("host", 0), ("host", 1), ("gpu", 1)]
    for run in report["runs"]:
        assert run["completed"] == 12 and run["failed"] == 0 and run["ttft_later_turns_s"]["p50"] > 0
        assert run["prefix_cache"]["hit_tokens_gpu"] > 0
    host = [r["prefix_cache"] for r in report["runs"] if r["mode"] == "host"]
    gpu = [r["prefix_cache"] for r in report["runs"] if r["mode"] == "gpu"]
    assert all(c["hit_tokens_host"] == 0 and c["demoted_bytes"] == 0 for c in gpu), "fraction 0: no host tier"
    assert sum(c["hit_tokens_host"] for c in host) > 0, "histories the GPU pool evicted came back from the host"
    summary = report["summary"]
    for key in ("ttft_later_p50_s", "output_throughput", "tpot_p99_s"):
        spread = summary[key]["spread"]["host"]
        assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
        assert summary[key]["vs_gpu"]["host"]["ratio"] > 0
    assert set(report["targets"]) == {"ttft_later_p50_s", "output_throughput", "tpot_p99_s"}
