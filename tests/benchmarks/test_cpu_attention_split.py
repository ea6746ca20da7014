"""The one-process vs per-rank CPU attention benchmark runs end to end on a tiny geometry slice."""

from __future__ import annotations

import json

from neo_bench import cpu_attention_split


def test_both_layouts_read_the_same_bytes_and_report(tmp_path, capsys) -> None:
    assert cpu_attention_split.main(["--model", "llama-3-8b", "--threads", "2", "--ranks", "1,2", "--requests", "4",
                                     "--context", "64", "--reps", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu_attention_split.json").read_text())
    one, split = report["rows"]
    assert one["layout"] == "one" and one["threads_per_process"] == [2]
    assert split["layout"] == "split x2" and split["threads_per_process"] == [1, 1] and len(split["per_rank_ms"]) == 2
    assert split["step_ms"] == max(split["per_rank_ms"])
    # GB/s is the whole model's KV bytes over the step time in both layouts
    for row in (one, split):
        assert abs(row["read_gbps"] - 2 * 8 * 128 * 2 * 4 * 64 / (row["step_ms"] / 1e3) / 1e9) < 1e-6
    assert (tmp_path / "cpu_attention_split.png").stat().st_size > 0
    assert "split x2" in capsys.readouterr().out
