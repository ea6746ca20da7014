"""benchmarks/structured_load.py: its arithmetic and checks on fixed inputs, and end to end on one real
`neo serve` (the embedded model on the CPU): both variants run to ``length``, the json one's text a
JSON prefix of the schema, ABBA, a spread and a verdict."""

from __future__ import annotations

import json

import pytest

from neo_bench.comparison import summarize_modes
from neo_bench.structured_load import (KEY, Variant, extra_body, iteration_figures, json_prefix_ok, main,
                                       parse_args, problems, schema, structured_cost)


def _throughput(plain: list[float], structured: list[float]) -> dict:
    runs = {"plain": [{"t": x} for x in plain], "json": [{"t": x} for x in structured]}
    return summarize_modes(runs, lambda r: r["t"], "plain")


@pytest.mark.parametrize("plain, structured, cost, cost_min, cost_max, verdict", [
    ([100, 101, 102], [97, 98, 99], 1 - 98 / 101, 1 - 99 / 100, 1 - 97 / 102, "met"),          # 3% apart
    ([100, 101, 102], [93, 95, 96], 1 - 95 / 101, 1 - 96 / 100, 1 - 93 / 102, "missed"),       # 6% apart
    ([100, 110, 120], [95, 100, 105], 1 - 100 / 110, 1 - 105 / 100, 1 - 95 / 120, "no difference"),
    ([100, 101, 102], [103, 104, 105], 1 - 104 / 101, 1 - 105 / 100, 1 - 103 / 102, "met"),    # json faster
])
def test_structured_cost_is_one_minus_the_median_ratio_with_its_range_and_verdict(plain, structured, cost, cost_min,
                                                                                   cost_max, verdict):
    c = structured_cost(_throughput(plain, structured))
    assert c["cost"] == pytest.approx(cost) and c["cost_min"] == pytest.approx(cost_min)
    assert c["cost_max"] == pytest.approx(cost_max) and c["verdict"] == verdict and c["target"] == 0.05


def test_structured_cost_without_both_variants_is_none():
    assert structured_cost(_throughput([100, 101, 102], []))["verdict"] is None


@pytest.mark.parametrize("text, ok", [
    ("", True), ("{", True), ('{ "te', True), ('{"text" :', True), ('{"text": "', True), ('{"text":"abc', True),
    ('{"text":"ab\\', True), ('{"text":"ab\\u00', True), ('{"text":"a\\"b', True), ('{"text":"\ufffd x', True),
    ('{"tex t', False), ('{"other":"', False), ('{"text":"a"}', False), ('{"text":"ab"', False),
    ('{"text":"a\x01', False), ("[", False), ("x", False), ('{"text":"a\\x', False),
])
def test_json_prefix_of_the_schema(text, ok):
    assert json_prefix_ok(text) is ok


def test_the_schema_cannot_close_within_max_tokens_and_both_variants_ignore_eos():
    s = schema(16)
    assert s["required"] == [KEY] and s["properties"][KEY]["minLength"] >= 16 * 81   # SmolLM2's longest token: 81
    assert extra_body(Variant.PLAIN, 16) == {"ignore_eos": True}
    body = extra_body(Variant.JSON, 16)
    assert body["ignore_eos"] is True and body["response_format"]["json_schema"]["schema"] == s
    assert body["response_format"]["type"] == "json_schema" and body["response_format"]["json_schema"]["strict"]


def test_problems_name_what_makes_a_run_unfit():
    def rec(**kw) -> dict:
        return {"error": None, "finish_reason": "length", "tokens": 8, "text": '{"text":"ab', **kw}

    assert problems([rec(), rec()], Variant.JSON, 8) == []
    assert problems([rec(text="no json")], Variant.PLAIN, 8) == []
    assert problems([rec(text="no json")], Variant.JSON, 8) == ["not a JSON prefix of the schema: 'no json'"]
    assert problems([rec(finish_reason="stop", tokens=5)], Variant.PLAIN, 8) == \
        ["finish_reason 'stop' after 5 tokens (asked 8)"]
    assert problems([rec(tokens=7)], Variant.PLAIN, 8) == ["finish_reason 'length' after 7 tokens (asked 8)"]
    assert problems([rec(error="APIError: boom")] * 3, Variant.PLAIN, 8) == ["APIError: boom"]


def _scrape(it_sum: float, it_n: int, w_sum: float, ahead: int) -> str:
    return "\n".join([
        "# HELP neo:iteration_duration_seconds x", "# TYPE neo:iteration_duration_seconds histogram",
        f'neo:iteration_duration_seconds_sum{{model_name="m"}} {it_sum}',
        f'neo:iteration_duration_seconds_count{{model_name="m"}} {it_n}',
        f'neo:worker_iteration_seconds_sum{{model_name="m"}} {w_sum}',
        f'neo:worker_iteration_seconds_count{{model_name="m"}} {it_n}',
        f'neo:worker_launched_ahead_total{{model_name="m"}} {ahead}'])


def test_iteration_figures_are_the_means_between_two_scrapes():
    got = iteration_figures(_scrape(1.0, 10, 0.8, 5), _scrape(3.0, 110, 2.3, 95))
    assert got["iteration_s"] == pytest.approx(0.02) and got["worker_iteration_s"] == pytest.approx(0.015)
    assert got["iterations"] == 100 and got["launched_ahead_share"] == pytest.approx(0.9)
    assert got["overhead_fraction"] == pytest.approx(1 - 1.5 / 2.0)
    none = iteration_figures(_scrape(3.0, 110, 2.3, 95), _scrape(3.0, 110, 2.3, 95))
    assert none["iteration_s"] is None and none["launched_ahead_share"] is None and none["iterations"] == 0


def test_arguments():
    args = parse_args([])
    assert (args.concurrency, args.input_len, args.output_len, args.reps) == (64, 256, 256, 3)
    assert args.order == ["plain#0", "json#0", "json#1", "plain#1", "plain#2", "json#2"]
    for bad in (["--reps", "2"], ["--concurrency", "0"], ["--output-len", "0"], ["--label", "a/b"], ["--vocab", "50"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.integration
def test_both_variants_on_the_embedded_model_run_to_length(tmp_path):
    code = main(["--device", "cpu", "--num-gpu-blocks", "48", "--max-model-len", "256", "--max-num-seqs", "8",
                 "--concurrency", "4", "--input-len", "24", "--output-len", "16", "--reps", "3", "--vocab", "49152",
                 "--ready-timeout", "120", "--stop-grace", "20", "--label", "ci", "--out", str(tmp_path)])
    assert code == 0, (tmp_path / "serve_ci_load.log").read_text()[-3000:]
    report = json.loads((tmp_path / "structured_load_ci.json").read_text())
    assert set(report) == {"config", "hardware", "order", "server", "runs", "summary"}
    assert (tmp_path / "structured_load_ci.png").stat().st_size > 0
    assert report["order"] == ["plain#0", "json#0", "json#1", "plain#1", "plain#2", "json#2"]
    assert [f"{r['mode']}#{r['rep']}" for r in report["runs"]] == report["order"]
    assert report["server"]["warmup_json_problems"] == report["server"]["warmup_plain_problems"] == []
    for run in report["runs"]:
        assert run["completed"] == 4 and run["failed"] == 0 and run["problems"] == []
        assert run["output_throughput"] > 0 and run["tpot_s"]["p50"] > 0
        assert run["iterations"] >= 15 and run["worker_iteration_s"] > 0 and run["iteration_s"] > 0
    for run in (r for r in report["runs"] if r["mode"] == "json"):   # ran to length inside the schema's string
        assert run["sample_text"].startswith('{"') and json_prefix_ok(run["sample_text"])
    summary = report["summary"]
    for key in ("output_throughput", "tpot_p50_s", "iteration_s", "worker_iteration_s"):
        for v in ("plain", "json"):
            s = summary[key]["spread"][v]
            assert s["n"] == 3 and s["min"] <= s["median"] <= s["max"]
    assert set(summary["bitmask_per_iteration_s"]) == {"iteration_s", "worker_iteration_s"}
    assert summary["bitmask_per_iteration_s"]["iteration_s"] == pytest.approx(
        summary["iteration_s"]["spread"]["json"]["median"] - summary["iteration_s"]["spread"]["plain"]["median"])
    cost = summary["structured_cost"]
    assert cost["cost_min"] <= cost["cost"] <= cost["cost_max"]
    assert cost["verdict"] in ("met", "missed", "no difference")
