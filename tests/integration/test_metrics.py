"""/metrics before and after known traffic on a real replica: vLLM's series (names, labels, buckets)
and NEO's own move by exactly what that traffic implies."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neo_gateway.vllm_metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
VLLM = {"model_name": MODEL, "engine": "0"}
NEO = {"model_name": MODEL}

# vLLM's boundaries as its PrometheusStatLogger declares them (vllm/v1/metrics/loggers.py), spelled
# out here so a change in vllm_metrics cannot pass unnoticed
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def buckets(samples, name: str) -> list[float]:
    return sorted(float(dict(labels)["le"]) for (n, labels) in samples if n == f"{name}_bucket"
                  and dict(labels)["le"] != "+Inf")


def test_vllm_series_move_by_the_traffic(small_pool_replica):
    url = small_pool_replica.url
    before = scrape(url)
    usages = []
    for i in range(3):
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Numbers: " + "1 " * (i + 1), "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}).json()
        usages.append(r["usage"])
    stop = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": ["6"]}).json()
    assert stop["choices"][0]["finish_reason"] == "stop"
    usages.append(stop["usage"])
    after = scrape(url)

    def delta(name: str, labels=VLLM, **extra) -> float:
        key = (name, frozenset({**labels, **extra}.items()))
        assert key in after, f"{name} {labels | extra} not exported"
        return after[key] - before.get(key, 0.0)

    generated = [u["completion_tokens"] for u in usages]
    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:generation_tokens_total") == sum(generated) == 15 + generated[3]
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:request_success_total", finished_reason="stop") == 1
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds"):
        assert delta(f"vllm:{hist}_count") == 4, hist
        assert delta(f"vllm:{hist}_bucket", le="+Inf") == 4, hist
    # inter-token latency: one observation per token after the first, summing to the decode phases
    assert delta("vllm:inter_token_latency_seconds_count") == sum(n - 1 for n in generated)
    assert delta("vllm:inter_token_latency_seconds_sum") == pytest.approx(
        delta("vllm:request_decode_time_seconds_sum"), abs=1e-6)
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta("vllm:request_inference_time_seconds_sum") > 0
    # vLLM's bucket boundaries
    assert buckets(after, "vllm:time_to_first_token_seconds") == VLLM_TTFT == list(TTFT_BUCKETS)
    for name in ("inter_token_latency_seconds", "request_time_per_output_token_seconds"):
        assert buckets(after, f"vllm:{name}") == VLLM_ITL == list(TOKEN_LATENCY_BUCKETS)
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds"):
        assert buckets(after, f"vllm:{name}") == VLLM_REQUEST == list(REQUEST_LATENCY_BUCKETS)
    # scheduler state, read at scrape time
    assert after[("vllm:num_requests_running", frozenset(VLLM.items()))] == 0
    assert after[("vllm:num_requests_waiting", frozenset(VLLM.items()))] == 0
    assert after[("vllm:kv_cache_usage_perc", frozenset(VLLM.items()))] == 0.0
    assert ("vllm:num_preemptions_total", frozenset(VLLM.items())) in after
    assert delta("vllm:prefix_cache_queries_total") >= delta("vllm:prefix_cache_hits_total") >= 0
    # NEO's own series stay under neo:
    iterations = delta("neo:iteration_duration_seconds_count", NEO)
    assert iterations >= 15 + 4 and delta("neo:worker_iteration_seconds_count", NEO) == iterations
    assert not [n for (n, _) in after if n.startswith("neo:") and n.removeprefix("neo:").startswith(
        ("num_requests_running", "kv_cache_usage", "prompt_tokens", "request_success", "time_to_first"))]


def test_prefix_cache_hits_count_a_repeated_prompt(small_pool_replica):
    url = small_pool_replica.url
    prompt = "A long shared prefix of words that spans several blocks of the cache. " * 6
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
    before = scrape(url)
    r = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    after = scrape(url)
    key = ("vllm:prefix_cache_hits_total", frozenset(VLLM.items()))
    hits = after[key] - before[key]
    # every full block but the one holding the last prompt token comes from the cache
    assert 0 < hits <= r["usage"]["prompt_tokens"] and hits % 16 == 0
