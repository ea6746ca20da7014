"""The NEO vs GPU-only benchmark: its pure pieces, and one GPU-only run of main() on the embedded model."""

from __future__ import annotations

import json

import pytest

from support.cost_tables import synthetic
from neo_bench.neo_vs_gpu_only import (main, parse_args, predict_gain, serve_args, steady_window, summarize_metrics,
                                       token_times)

pytestmark = pytest.mark.integration

METRICS = """\
# HELP neo:iteration_plan_total Iterations by plan.
# TYPE neo:iteration_plan_total counter
neo:iteration_plan_total{model_name="m",plan="sequential"} 10.0
neo:iteration_plan_total{model_name="m",plan="pipelined"} 30.0
neo:swaps_total{direction="out",model_name="m"} 4.0
neo:num_requests_decoding{model_name="m",place="cpu"} 0.0
neo:iteration_duration_seconds_sum{model_name="m"} 2.0
neo:iteration_duration_seconds_count{model_name="m"} 40.0
neo:forward_predicted_seconds_sum{model_name="m"} 0.9
neo:forward_predicted_seconds_count{model_name="m"} 40.0
neo:forward_measured_seconds_sum{model_name="m"} 1.0
neo:forward_measured_seconds_count{model_name="m"} 40.0
neo:gpu_kv_blocks_total{model_name="m"} 1650.0 1700000000000
garbage line {
"""


def test_metrics_parsing_reports_present_names_and_none_for_absent_ones():
    m = summarize_metrics(METRICS)
    assert (m["plan_sequential"], m["plan_pipelined"], m["swaps_out"]) == (10.0, 30.0, 4.0)
    assert m["swaps_in"] is None and m["decoding_gpu"] is None and m["decoding_cpu"] == 0.0
    assert m["iteration_s"] == pytest.approx(0.05) and m["worker_iteration_s"] is None
    assert m["forward_predicted_over_measured"] == pytest.approx(0.9) and m["gpu_kv_blocks_total"] == 1650.0
    assert all(v is None for v in summarize_metrics("").values())


def _request(start: float, first: float, gaps: list[float]) -> dict:
    return {"start": start, "ttft": first - start, "itl": gaps, "e2e": first + sum(gaps) - start + 0.01,
            "tokens": len(gaps) + 1, "prompt_tokens": 8, "error": None}


def test_token_times_rebuild_absolute_stamps():
    assert list(token_times(_request(1.0, 1.5, [0.25, 0.25]))) == [1.5, 1.75, 2.0]


def test_steady_window_when_every_request_fits_at_once():
    # 10 requests, first tokens at 0.1..1.0, 1 token per 0.1 s until 3.0 + i*0.1: window [1.0, first end]
    reqs = [_request(0.0, 0.1 * (i + 1), [0.1] * (29 - i)) for i in range(10)]
    w = steady_window(reqs)
    assert not w["fallback"] and w["t_start"] == pytest.approx(1.0) and w["t_end"] == pytest.approx(3.01)
    assert w["throughput"] == pytest.approx(w["tokens"] / w["duration_s"]) and 150 < w["tokens"] <= 210


def test_steady_window_under_memory_pressure_is_the_churn_phase():
    # Two at a time: request i starts decoding at i//2 * 1.0 and finishes 1 s later (10 tokens).
    reqs = [_request(0.0, (i // 2) * 1.0 + 0.05, [0.1] * 9) for i in range(20)]
    w = steady_window(reqs)
    assert w["t_start"] == pytest.approx(1.0 - 0.04) and w["t_end"] == pytest.approx(9.05)
    assert w["throughput"] == pytest.approx(20, rel=0.1), "two streams of 10 tok/s"


def test_steady_window_falls_back_to_the_whole_run_and_tolerates_failures():
    late = {**_request(0.0, 1.0, []), "e2e": 1.0}  # window [0.51, 1.0]: 1 token of 22
    thin = steady_window([late, _request(0.0, 0.1, [0.02] * 20)])
    assert thin["fallback"] and thin["tokens"] == 22 and thin["duration_s"] == pytest.approx(1.0)
    assert steady_window([late])["fallback"], "empty window: first token and first finish coincide"
    assert steady_window([{"start": 0, "ttft": None, "itl": [], "e2e": 1, "tokens": 0, "error": "x"}])["fallback"]


def test_prediction_gains_with_a_fast_host_and_a_tiny_gpu_budget():
    pred = predict_gain(synthetic(), 394.5, num_gpu_blocks=54, num_cpu_blocks=6000, max_num_seqs=256)
    assert pred["gpu_decodes"] == 2 and pred["cpu_decodes_hidden"] > 0 and pred["plan"] == "pipelined"
    assert pred["gain"] > 1.5


def test_prediction_is_exactly_one_when_the_host_hides_nothing():
    pred = predict_gain(synthetic(cpu_s_per_token=4e-6), 394.5, 54, 6000, 256)
    assert pred["gain"] == 1.0 and pred["cpu_decodes_hidden"] == 0 and pred["plan"] == "sequential"
    assert predict_gain(synthetic(), 394.5, 54, 0, 256)["gain"] == 1.0, "no host pool: nothing to offload"


def test_a_variant_runs_its_offload_mode_with_its_own_flags_after_the_modes():
    args = parse_args(["--modes", "off,auto", "--variant", "auto-eager=auto:--pipeline-graphs false",
                       "--num-cpu-blocks", "64", "--serve-arg=--cpu-attention-addr tcp://127.0.0.1:9"])
    assert args.modes == ["off", "auto", "auto-eager"]
    argv = serve_args(args, *args.variants["auto-eager"])
    assert argv[-4:] == ["--offload-mode", "auto", "--pipeline-graphs", "false"] and "--num-cpu-blocks" in argv
    for bad in (["auto=auto:"], ["x=fast:"], ["=auto:"], ["a/b=auto:"], ["v=auto:", "--variant", "v=full:"]):
        with pytest.raises(SystemExit):
            parse_args(["--variant", *bad])


def test_gpu_only_run_of_main_on_the_embedded_model(tmp_path):
    """Two interleaved repetitions of one mode against a real `neo serve` (live server, warmed up)."""
    tables = synthetic().save(str(tmp_path / "cost.json"))
    code = main(["--modes", "off", "--device", "cpu", "--num-gpu-blocks", "48", "--max-model-len", "512",
                 "--max-num-seqs", "8", "--workload", "fixed", "--input-len", "8", "--output-len", "3",
                 "--num-prompts", "4", "--rates", "2,inf", "--offline-prompts", "4", "--warmup", "1", "--reps", "2",
                 "--vocab", "49152", "--cost-tables", tables, "--host-bandwidth-gbs", "12.5", "--ready-timeout", "120",
                 "--label", "ci", "--out", str(tmp_path)])
    assert code == 0, (tmp_path / "serve_ci_off.log").read_text()[-3000:]
    report = json.loads((tmp_path / "neo_vs_gpu_only_ci.json").read_text())
    assert set(report) >= {"config", "hardware", "modes", "runs", "metrics", "prediction", "summary", "headline"}
    assert report["order"] == ["off#0", "off#1"]
    assert report["modes"]["off"]["error"] is None and "--num-cpu-blocks" not in report["modes"]["off"]["serve_args"]
    assert [(r["mode"], r["rep"]) for r in report["runs"]] == [("off", 0), ("off", 1)]
    for run in report["runs"]:
        assert [o["rate"] for o in run["online"]] == [2.0, float("inf")]
        assert all(o["completed"] == 4 and o["failed"] == 0 for o in run["online"])
        assert run["offline"]["completed"] == 4 and run["offline"]["makespan_s"] > 0
    spread = report["summary"]["whole_run"]["spread"]["off"]
    assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert report["summary"]["online"]["off"]["2.0"]["reps"] == 2
    assert report["metrics"]["off"]["iteration_s"] > 0 and report["metrics"]["off"]["gpu_kv_blocks_total"] == 48
    assert report["prediction"]["gain"] == 1.0 and report["hardware"]["host_bandwidth_gbs"] == 12.5
    assert (tmp_path / "neo_vs_gpu_only_ci.png").stat().st_size > 1000
