"""`neo probe-bandwidth --json`: the one-line format the operator's probe Job parses."""

from __future__ import annotations

import json
import subprocess
import sys

from neo_cpu_attention import membw


def test_probe_prints_one_json_line():
    out = subprocess.run([sys.executable, "-m", "neo_common.cli", "probe-bandwidth", "--json", "--threads", "1",
                          "--size-mb", "64", "--reps", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"read_gbps", "threads", "cpu_model"}
    assert result["read_gbps"] > 0 and result["threads"] == 1 and result["cpu_model"]


def test_measure_read_bandwidth_in_process():
    assert membw.measure_read_bandwidth(1, 32 << 20, reps=2) > 0
