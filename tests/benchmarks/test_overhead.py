"""neo_bench.overhead: 1 - worker time / gateway wall time, over a whole scrape or between two."""

from __future__ import annotations

import pytest

from neo_bench.overhead import main, overhead

EARLY = """neo:iteration_duration_seconds_sum{model_name="m"} 2.0
neo:iteration_duration_seconds_count{model_name="m"} 100.0
neo:worker_iteration_seconds_sum{model_name="m"} 1.5
neo:worker_launched_ahead_total{model_name="m"} 60.0
"""
LATE = """# HELP neo:iteration_duration_seconds Gateway wall time
neo:iteration_duration_seconds_sum{model_name="m"} 4.0
neo:iteration_duration_seconds_count{model_name="m"} 200.0
neo:worker_iteration_seconds_sum{model_name="m"} 3.4
neo:worker_launched_ahead_total{model_name="m"} 150.0
"""


def test_whole_run_and_the_iterations_between_two_scrapes():
    whole = overhead(LATE)
    assert whole["iterations"] == 200 and whole["overhead_fraction"] == pytest.approx(0.15)
    window = overhead(LATE, since=EARLY)   # the last 100 iterations: 2.0 s wall, 1.9 s in the worker
    assert window["iterations"] == 100 and window["overhead_fraction"] == pytest.approx(0.05)
    assert window["wall_ms"] == pytest.approx(20.0) and window["worker_ms"] == pytest.approx(19.0)
    assert whole["launched_ahead"] == 150 and window["launched_ahead"] == 90


def test_a_scrape_without_iterations_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="no iteration"):
        overhead("neo:other 1\n")
    early, late = tmp_path / "early.txt", tmp_path / "late.txt"
    early.write_text(EARLY)
    late.write_text(LATE)
    assert main([str(late), "--since", str(early)]) == 0
    assert "5.0% of iteration time, 90 launched ahead" in capsys.readouterr().out
