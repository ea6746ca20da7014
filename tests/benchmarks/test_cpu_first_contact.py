"""The first-contact benchmark's report: spreads per mode, the two verdicts against their goals, the
table and the plot, from runs in ABBA order (the servers and models themselves are exercised by the
committed run under docs/benchmarks/cpu_first_contact)."""

from __future__ import annotations

import pytest

from neo_bench.comparison import abba_order
from neo_bench.cpu_first_contact import parse_args, plot, report, table

RATES = {"hf_1": [10.0, 11.0, 12.0], "neo_1": [14.0, 15.0, 16.0], "neo_8": [50.0, 70.0, 80.0]}


def _runs(rates: dict[str, list[float]], reps: int = 3) -> list[dict]:
    return [{"rep": r, "mode": m, "tok_s": rates[m][r], "wall_s": 64 / rates[m][r], "tokens": 64,
             "load_1m": 1.0 + r, "error": None} for r, m in abba_order(list(rates), reps)]


def test_report_spreads_and_verdicts(tmp_path):
    args = parse_args(["--reps", "3", "--out", str(tmp_path)])
    rep = report(args, list(RATES), _runs(RATES))
    assert rep["spread"]["neo_1"] == {"min": 14.0, "median": 15.0, "max": 16.0, "n": 3}
    single, many = rep["verdicts"]["neo_1_vs_hf_1"], rep["verdicts"]["neo_8_vs_neo_1"]
    assert single["ratio"] == pytest.approx(15 / 11) and single["met"] and single["difference"]
    assert single["ratio_min"] == pytest.approx(14 / 12) and single["ratio_max"] == pytest.approx(16 / 10)
    assert many["ratio"] == pytest.approx(70 / 15) and many["met"]
    assert rep["load_1m"]["max"] == 3.0
    text = table(rep)
    assert "neo_1_vs_hf_1: 1.36x [1.17-1.60] (goal >= 1.2x: met)" in text
    plot(rep, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_missed_goal_and_failed_runs(tmp_path):
    slow = {**RATES, "neo_8": [20.0, 30.0, 40.0]}
    runs = _runs(slow)
    runs[0]["error"] = "generated 3 tokens, not 64"   # hf_1's first run: left out of its spread
    rep = report(parse_args(["--out", str(tmp_path)]), list(slow), runs)
    assert rep["spread"]["hf_1"]["n"] == 2
    assert rep["verdicts"]["neo_8_vs_neo_1"]["met"] is False
    assert "goal >= 4.0x: NOT met" in table(rep)


def test_bad_arguments():
    for argv in (["--reps", "0"], ["--streams", "1"], ["--hf-threads", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
