"""A client that goes away (streaming or not, mid-prefill or mid-decode) frees its KV at once, in
the GPU pool and, with every decode offloaded, in the host pool."""

from __future__ import annotations

import time

import httpx
import pytest

from support.replica import SMALL_POOL_BLOCKS, Replica

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def wait_all_free(replica, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (replica.metric("neo:gpu_kv_blocks_free") == replica.metric("neo:gpu_kv_blocks_total")
                and replica.metric("neo:cpu_kv_cache_usage_perc") == 0
                and replica.metric("vllm:num_requests_running") == 0):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def offload_replica(tmp_path_factory):
    """Every decode on the CPU (offload ``full``): an abort must free host blocks too."""
    tmp = tmp_path_factory.mktemp("offload")
    r = Replica(["--offload-mode", "full", "--num-gpu-blocks", str(SMALL_POOL_BLOCKS), "--num-cpu-blocks", "96",
                 "--kv-cache-dtype", "bfloat16", "--cpu-threads", "1", "--max-model-len", "512"],
                str(tmp / "serve.log"), env={"NEO_COST_CACHE_DIR": str(tmp / "cost")})
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("when_s", [0.3, 2.0], ids=["early", "mid-decode"])
def test_disconnect_aborts_and_frees_blocks(request, pool, stream, when_s):
    replica = request.getfixturevalue("small_pool_replica" if pool == "gpu" else "offload_replica")
    body = {"model": MODEL, "prompt": "Tell me everything about the ocean. " * 20, "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    url = replica.url + "/v1/completions"
    if stream:  # read the event stream for a while, then hang up
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            t0 = time.monotonic()
            for _ in r.iter_lines():
                if time.monotonic() - t0 > when_s:
                    break
    else:  # the whole answer takes far longer than when_s: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=when_s)
    assert wait_all_free(replica), "blocks still held after the client left"
    ok = httpx.post(replica.url + "/v1/completions", timeout=120,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200
