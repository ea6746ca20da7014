"""The comparison method of the NEO benchmarks on a fake clock: the run order is interleaved
(ABBA), the spread and the verdict follow the repetitions, and a drift over the run (the first
server of a call being slow) cannot turn equal modes into a gain, as it did with one run per mode
in a fixed order."""

from __future__ import annotations

import statistics

import pytest

from neo_bench.comparison import Spread, abba_order, describe, max_rate_under_slo, summarize_modes, verdict


def test_order_is_abba():
    assert abba_order(["off", "auto"], 4) == [(0, "off"), (0, "auto"), (1, "auto"), (1, "off"),
                                              (2, "off"), (2, "auto"), (3, "auto"), (3, "off")]
    assert [m for _, m in abba_order(["a", "b", "c"], 2)] == ["a", "b", "c", "c", "b", "a"]


class FakeClock:
    """Runs take ``work / speed`` seconds; the machine warms up: run k of the call is slower by
    ``drift / (k + 1)`` (the first run pays the most, as seen on the GPU host)."""

    def __init__(self, drift: float) -> None:
        self.drift, self.k = drift, 0

    def throughput(self, speed: float, work: float = 1000.0) -> float:
        seconds = work / speed * (1.0 + self.drift / (self.k + 1))
        self.k += 1
        return work / seconds


def run_method(order, speeds: dict[str, float], drift: float) -> dict:
    clock = FakeClock(drift)
    results: dict[str, list[dict]] = {m: [] for m in speeds}
    for _, mode in order:
        results[mode].append({"tok_s": clock.throughput(speeds[mode])})
    return summarize_modes(results, lambda r: r["tok_s"])


def test_a_drift_cannot_make_equal_modes_differ():
    equal = {"off": 100.0, "auto": 100.0}
    # one run each, GPU-only first: the old method reports a gain that is only the drift
    once = run_method([(0, "off"), (0, "auto")], equal, drift=0.2)
    assert once["vs_off"]["auto"]["ratio"] > 1.05 and once["vs_off"]["auto"]["difference"] is True
    # interleaved and repeated: the ratio is within the drift's noise and the verdict says so
    abba = run_method(abba_order(["off", "auto"], 4), equal, drift=0.2)
    v = abba["vs_off"]["auto"]
    assert v["difference"] is False and v["ratio"] == pytest.approx(1.0, abs=0.06)
    assert describe(v).startswith("no difference")


def test_a_real_gain_is_reported_with_its_range():
    res = run_method(abba_order(["off", "auto"], 3), {"off": 100.0, "auto": 130.0}, drift=0.05)
    v = res["vs_off"]["auto"]
    assert v["difference"] is True and v["ratio"] == pytest.approx(1.3, rel=0.03)
    assert v["ratio_min"] <= v["ratio"] <= v["ratio_max"]
    s = res["spread"]["auto"]
    assert s["n"] == 3 and s["min"] <= s["median"] <= s["max"]
    assert describe(v).startswith("1.29x [")


def test_spread_and_verdict_arithmetic():
    a, b = Spread.of([3.0, 1.0, 2.0]), Spread.of([4.0, 6.0, 5.0])
    assert (a.min, a.median, a.max, a.n) == (1.0, 2.0, 3.0, 3)
    assert Spread.of([None, None]) is None
    v = verdict(b, a)
    assert v == {"ratio": 2.5, "ratio_min": 4.0 / 3.0, "ratio_max": 6.0, "difference": True}
    assert verdict(a, Spread.of([2.5]))["difference"] is False
    assert verdict(None, a)["ratio"] is None
    assert statistics.median([1, 2, 3]) == 2


def test_max_rate_under_slo_stops_at_the_first_miss():
    runs = [{"rate": 1.0, "p99": 0.05}, {"rate": 4.0, "p99": 0.3}, {"rate": 2.0, "p99": 0.1},
            {"rate": 8.0, "p99": 0.1}]
    assert max_rate_under_slo(runs, 0.2, lambda r: r["p99"]) == 2.0     # 8.0 is after the miss at 4.0
    assert max_rate_under_slo(runs, 0.01, lambda r: r["p99"]) is None
    assert max_rate_under_slo(runs + [{"rate": 0.5, "p99": 0.01, "failed": 1}], 1.0, lambda r: r["p99"]) is None
