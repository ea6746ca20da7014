"""/metrics before and after known traffic: counters and histograms move by exactly that traffic."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_counters_and_histograms_move_by_the_traffic(small_pool_replica):
    url = small_pool_replica.url
    label = f'model_name="{MODEL}"'
    before = scrape(url)
    prompt_tokens = 0
    for i in range(3):
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Numbers: " + "1 " * (i + 1), "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}).json()
        prompt_tokens += r["usage"]["prompt_tokens"]
    stop = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": ["6"]}).json()
    assert stop["choices"][0]["finish_reason"] == "stop"
    after = scrape(url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(f"neo:prompt_tokens_total{{{label}}}") == prompt_tokens + stop["usage"]["prompt_tokens"]
    assert delta(f"neo:generation_tokens_total{{{label}}}") == 15 + stop["usage"]["completion_tokens"]
    assert delta(f'neo:request_success_total{{finished_reason="length",{label}}}') == 3
    assert delta(f'neo:request_success_total{{finished_reason="stop",{label}}}') == 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert delta(f"neo:{hist}_count{{{label}}}") == 4, hist
        assert delta(f"neo:{hist}_sum{{{label}}}") > 0, hist
    iterations = delta(f"neo:iteration_duration_seconds_count{{{label}}}")
    assert iterations >= 15 + 4 and delta(f"neo:worker_iteration_seconds_count{{{label}}}") == iterations
    assert 0 < delta(f"neo:worker_iteration_seconds_sum{{{label}}}") < delta(f"neo:iteration_duration_seconds_sum{{{label}}}")
    assert after[f"neo:num_requests_running{{{label}}}"] == 0
    assert after[f"neo:kv_cache_usage_perc{{{label}}}"] == 0.0
