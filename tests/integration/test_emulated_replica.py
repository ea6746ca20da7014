"""A replica under GPU emulation (``--emulate-gpu``, the CPU twin here): it serves, and says so in
its metrics and log, and its cost tables are keyed by the emulated GPU."""

from __future__ import annotations

import httpx
import pytest

from support.replica import Replica

pytestmark = pytest.mark.integration


def test_an_emulated_replica_serves_and_labels_itself(tmp_path):
    r = Replica(["--emulate-gpu", "t4", "--offload-mode", "auto", "--num-gpu-blocks", "64", "--num-cpu-blocks", "32",
                 "--kv-cache-dtype", "bfloat16", "--max-model-len", "256", "--cpu-threads", "1"],
                str(tmp_path / "serve.log"), env={"NEO_COST_CACHE_DIR": str(tmp_path / "cost")})
    try:
        r.wait_ready()
        out = httpx.post(r.url + "/v1/completions", timeout=120,
                         json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
        text = httpx.get(r.url + "/metrics", timeout=30).text
        assert 'neo:worker_info{device="emulated t4 on cpu"' in text
        assert any("-emulated-t4-on-cpu-" in p.name for p in (tmp_path / "cost").iterdir())
        assert "GPU emulation on" in (tmp_path / "serve.log").read_text()
    finally:
        r.stop()
