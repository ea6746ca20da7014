"""A client that goes away (streaming or not, mid-prefill or mid-decode) frees its KV at once."""

from __future__ import annotations

import time

import httpx
import pytest

from support.replica import SMALL_POOL_BLOCKS

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def wait_all_free(replica, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (replica.metric("neo:gpu_kv_blocks_free") == SMALL_POOL_BLOCKS
                and replica.metric("neo:num_requests_running") == 0):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("when_s", [0.3, 2.0], ids=["early", "mid-decode"])
def test_disconnect_aborts_and_frees_blocks(small_pool_replica, stream, when_s):
    body = {"model": MODEL, "prompt": "Tell me everything about the ocean. " * 20, "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    url = small_pool_replica.url + "/v1/completions"
    if stream:  # read the event stream for a while, then hang up
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            t0 = time.monotonic()
            for _ in r.iter_lines():
                if time.monotonic() - t0 > when_s:
                    break
    else:  # the whole answer takes far longer than when_s: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=when_s)
    assert wait_all_free(small_pool_replica), "blocks still held after the client left"
    ok = httpx.post(small_pool_replica.url + "/v1/completions", timeout=120,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200
