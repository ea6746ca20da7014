"""benchmarks/gateway_hot_path.py runs end to end on small counts and writes its report."""

import json

from neo_bench import gateway_hot_path


def test_small_run_writes_the_report(tmp_path, capsys):
    assert gateway_hot_path.main(["--reps", "3", "--tokens", "100", "--chunks", "100", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gateway_hot_path.json").read_text())
    assert set(report["results"]) == {"detokenize", "sse_chunk", "sse_chunk_logprobs", "response_256_logprobs"}
    for result in report["results"].values():
        assert len(result["us_per_item"]["before"]) == len(result["us_per_item"]["after"]) == 3
        assert result["paired_speedup"]["n"] == 3
    assert (tmp_path / "gateway_hot_path.png").stat().st_size > 0
    assert "detokenize" in capsys.readouterr().out
