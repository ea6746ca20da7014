"""The report of ``neo_vs_gpu_only``: per-mode spreads over interleaved repetitions
(``comparison``), online latency at equal rates, the SLO figure of merit, the servers' own metrics,
and the cost model's prediction; as a dict (the JSON), a text table and a PNG."""

from __future__ import annotations

import math
import statistics

from neo_bench.comparison import Spread, describe, max_rate_under_slo, summarize_modes

PAPER = {"paper-a": "+26% (1.26x) on A10G, Llama-3-8B, 1650 GPU blocks",
         "paper-b": "7.5x on T4, Llama-2-7B, 54 GPU blocks"}


def _whole(run: dict) -> float | None:
    off = run.get("offline")
    return off["output_throughput"] if off and not off.get("failed") else None


def _steady(run: dict) -> float | None:
    off = run.get("offline")
    return off["steady"]["throughput"] if off and not off.get("failed") else None


def _p(run: dict, key: str, q: str) -> float | None:
    return (run.get(key) or {}).get(q)


def summary(runs: list[dict], modes: list[str], slo_tpot_s: float) -> dict:
    """What the table and the JSON headline say; see ``comparison`` for the method."""
    by_mode = {m: [r for r in runs if r["mode"] == m and not r.get("error")] for m in modes}
    online: dict[str, dict] = {}
    for m, rs in by_mode.items():
        rates = sorted({o["rate"] for r in rs for o in r["online"]})
        online[m] = {}
        for rate in rates:
            at = [o for r in rs for o in r["online"] if o["rate"] == rate]
            med = lambda k, q: statistics.median(v for v in (_p(o, k, q) for o in at) if v is not None) \
                if any(_p(o, k, q) is not None for o in at) else None  # noqa: E731
            online[m][str(rate)] = {"reps": len(at), "failed": sum(o["failed"] for o in at),
                                    "ttft_p50_s": med("ttft_s", "p50"), "ttft_p99_s": med("ttft_s", "p99"),
                                    "tpot_p50_s": med("tpot_s", "p50"), "tpot_p99_s": med("tpot_s", "p99"),
                                    "output_tok_s": statistics.median(o["output_throughput"] for o in at)}
    slo = {}
    for m, rs in by_mode.items():
        per_rep = [max_rate_under_slo(r["online"], slo_tpot_s, lambda o: _p(o, "tpot_s", "p99")) for r in rs]
        slo[m] = {"per_rep": per_rep, "spread": (s.to_dict() if (s := Spread.of(per_rep)) else None)}
    return {"whole_run": summarize_modes(by_mode, _whole), "steady_window": summarize_modes(by_mode, _steady),
            "online": online, "slo_tpot_p99_s": slo_tpot_s, "max_rate_under_slo": slo}


def headline(report: dict) -> dict:
    """NEO (auto) over GPU-only, whole-run throughput, median over median; beside the prediction."""
    v = report["summary"]["whole_run"].get("vs_off", {}).get("auto") or {}
    return {"measured": v, "text": describe(v) if v else "-",
            "predicted_gain": (report.get("prediction") or {}).get("gain"),
            "paper": PAPER.get(report["config"]["workload"])}


def _f(x, spec: str, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x * scale if scale != 1.0 else x, spec)


def table(report: dict) -> str:
    s = report["summary"]
    lines = [f"{'mode':>10} {'reps':>4} {'whole-run tok/s min/med/max':>29} {'vs off':>28} "
             f"{'steady tok/s (secondary)':>25}"]
    for m in report["config"]["modes"]:
        w, st = s["whole_run"]["spread"].get(m), s["steady_window"]["spread"].get(m)
        vs = s["whole_run"].get("vs_off", {}).get(m)
        mmm = f"{w['min']:.0f}/{w['median']:.0f}/{w['max']:.0f}" if w else "-"
        lines.append(f"{m:>10} {(w or {}).get('n', 0):>4} {mmm:>29} {(describe(vs) if vs else 'base'):>28} "
                     f"{_f((st or {}).get('median'), '.0f'):>25}")
    lines.append(f"\n{'mode':>10} {'rate':>5} {'tok/s':>8} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} (median of reps)")
    for m, rates in s["online"].items():
        for rate, o in rates.items():
            lines.append(f"{m:>10} {float(rate):>5g} {o['output_tok_s']:>8.1f} "
                         f"{_f(o['ttft_p50_s'], '.0f', 1e3) + '/' + _f(o['ttft_p99_s'], '.0f', 1e3):>17} "
                         f"{_f(o['tpot_p50_s'], '.1f', 1e3) + '/' + _f(o['tpot_p99_s'], '.1f', 1e3):>17}")
    slo = s["max_rate_under_slo"]
    lines.append(f"\nhighest rate with p99 TPOT under {s['slo_tpot_p99_s'] * 1e3:.0f} ms, per rep: " + "; ".join(
        f"{m} {slo[m]['per_rep']}" for m in slo))
    lines.append(f"\n{'mode':>10} {'iters':>7} {'seq/pipe plans':>15} {'swaps out/in':>13} {'iter ms':>8} "
                 f"{'worker ms':>9} {'fwd pred/meas ms':>17} {'cpu wait ms':>11}")
    for mode, m in report["metrics"].items():
        fwd = lambda key: _f(m.get(key), ".2f", 1e3)  # noqa: E731
        lines.append(f"{mode:>10} {_f(m.get('iterations'), '.0f'):>7} "
                     f"{_f(m.get('plan_sequential'), '.0f') + '/' + _f(m.get('plan_pipelined'), '.0f'):>15} "
                     f"{_f(m.get('swaps_out'), '.0f') + '/' + _f(m.get('swaps_in'), '.0f'):>13} "
                     f"{_f(m.get('iteration_s'), '.2f', 1e3):>8} {_f(m.get('worker_iteration_s'), '.2f', 1e3):>9} "
                     f"{fwd('forward_predicted_s') + '/' + fwd('forward_measured_s'):>17} {fwd('cpu_wait_s'):>11}")
    h, p = report["headline"], report.get("prediction") or {}
    lines.append(f"\nNEO (auto) over GPU-only, whole-run throughput (median over median, range of the extremes): "
                 f"{h['text']} | cost model predicts {_f(h['predicted_gain'], '.2f')}x "
                 f"({_f(p.get('gpu_decodes'), 'd')} GPU + {_f(p.get('cpu_decodes_hidden'), 'd')}/"
                 f"{_f(p.get('cpu_decodes_offered'), 'd')} CPU decodes at context {_f(p.get('mean_context'), 'd')})"
                 f" | paper: {h['paper'] or '-'}")
    hw = report["hardware"]
    lines.append(f"hardware: GPU {hw.get('gpu_label') or hw['gpu'] or '-'} | CPU {hw['cpu_model'] or '-'} "
                 f"x{hw['cpu_cores']} | host bandwidth {_f(hw['host_bandwidth_gbs'], '.1f')} GB/s")
    return "\n".join(lines)


def plot(report: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    modes = [m for m in report["config"]["modes"] if s["whole_run"]["spread"].get(m)]
    spreads = [s["whole_run"]["spread"][m] for m in modes]
    axes[0].bar(modes, [w["median"] for w in spreads],
                yerr=[[w["median"] - w["min"] for w in spreads], [w["max"] - w["median"] for w in spreads]],
                capsize=6)
    axes[0].set_ylabel("whole-run output tok/s (median, min-max)")
    for m, rates in s["online"].items():
        xs = [float(r) for r in rates]
        axes[1].plot(xs, [(o["tpot_p99_s"] or float("nan")) * 1e3 for o in rates.values()], "o-", label=m)
        axes[2].plot(xs, [(o["ttft_p99_s"] or float("nan")) * 1e3 for o in rates.values()], "o-", label=m)
    axes[1].axhline(s["slo_tpot_p99_s"] * 1e3, color="grey", ls="--", label="SLO")
    axes[1].set_ylabel("TPOT p99 (ms)")
    axes[2].set_ylabel("TTFT p99 (ms)")
    for ax in axes[1:]:
        ax.set_xlabel("request rate (req/s)")
        ax.legend()
    fig.suptitle(f"{title} ({report['hardware'].get('gpu_label') or report['hardware']['gpu'] or 'cpu'})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
