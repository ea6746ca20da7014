"""How two or more serving modes are compared so that order and noise cannot decide the figure.

- **Interleaved**: repetition r runs the modes forward when r is even and backward when odd
  (A B, B A, A B, ... : ABBA for two modes), so a drift over the run (a warming GPU, a filling page
  cache, the first server being slow) falls on every mode alike.
- **Repeated and spread**: each mode's figure is reported as min / median / max over repetitions;
  the headline ratio is median over median; a ratio whose modes' ranges overlap is "no
  difference" (the two could not be told apart in this run).
- **The paper's figure of merit**: the highest offered request rate whose p99 TPOT stays under an
  SLO, per mode (from the online runs).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Iterable, Sequence


def abba_order(modes: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """``(repetition, mode)`` in run order: forward on even repetitions, backward on odd ones."""
    out = []
    for r in range(reps):
        seq = modes if r % 2 == 0 else list(reversed(modes))
        out += [(r, m) for m in seq]
    return out


@dataclasses.dataclass(frozen=True)
class Spread:
    """min / median / max of one figure over repetitions."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Spread | None":
        vs = [float(v) for v in values if v is not None]
        if not vs:
            return None
        return cls(min(vs), statistics.median(vs), max(vs), len(vs))

    def overlaps(self, other: "Spread") -> bool:
        return self.min <= other.max and other.min <= self.max

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def verdict(mode: Spread | None, base: Spread | None) -> dict:
    """The headline ratio of ``mode`` over ``base`` (median over median) with its range (worst and
    best pairing of the extremes) and whether it is a difference at all."""
    if mode is None or base is None or base.median <= 0 or base.min <= 0:
        return {"ratio": None, "ratio_min": None, "ratio_max": None, "difference": None}
    ratio = mode.median / base.median
    return {"ratio": ratio, "ratio_min": mode.min / base.max, "ratio_max": mode.max / base.min,
            "difference": not mode.overlaps(base)}


def describe(v: dict) -> str:
    """``1.27x`` when the ranges are apart, ``no difference (0.99x)`` when they overlap."""
    if v.get("ratio") is None:
        return "-"
    text = f"{v['ratio']:.2f}x [{v['ratio_min']:.2f}-{v['ratio_max']:.2f}]"
    return text if v["difference"] else f"no difference ({text})"


def max_rate_under_slo(online: Sequence[dict], slo_s: float, key: Callable[[dict], float | None]) -> float | None:
    """The highest offered rate among ``online`` runs whose ``key`` (e.g. p99 TPOT) is under
    ``slo_s``, every lower rate meeting it too (a rate after the first miss does not count)."""
    best = None
    for run in sorted(online, key=lambda r: r["rate"]):
        value = key(run)
        if value is None or value > slo_s or run.get("failed"):
            break
        best = run["rate"]
    return best


def summarize_modes(results: dict[str, list[dict]], figure: Callable[[dict], float | None],
                    base: str = "off") -> dict:
    """Per mode, the spread of ``figure`` over its repetitions, and each mode's verdict against ``base``."""
    spreads = {m: Spread.of(figure(r) for r in runs) for m, runs in results.items()}
    return {"spread": {m: (s.to_dict() if s else None) for m, s in spreads.items()},
            "vs_" + base: {m: verdict(s, spreads.get(base)) for m, s in spreads.items() if m != base}}


def spread_bars(ax, spread: dict[str, dict | None], values: dict[str, list[float]], ylabel: str,
                scale: float = 1.0) -> None:
    """One bar per mode at its median, whiskers to its min and max, each repetition a dot (a
    panel of a benchmark's PNG); ``spread``: mode -> ``Spread.to_dict()`` (None: did not run)."""
    modes = [m for m, s in spread.items() if s]
    med = [spread[m]["median"] * scale for m in modes]
    err = [[(spread[m]["median"] - spread[m]["min"]) * scale for m in modes],
           [(spread[m]["max"] - spread[m]["median"]) * scale for m in modes]]
    ax.bar(modes, med, yerr=err, capsize=6, color=[f"C{i}" for i in range(len(modes))])
    for i, m in enumerate(modes):
        ax.plot([i] * len(values.get(m, [])), [v * scale for v in values.get(m, [])], "k.", alpha=0.6)
    ax.set_ylabel(ylabel, fontsize=8)
