"""--api-key: the OpenAI routes need one of the keys (the official client sees AuthenticationError
without it), probes stay open, /metrics is closed with --protect-metrics, and the key reaches the
gateway through its environment, never through a child's argv (/proc/PID/cmdline is world-readable)."""

from __future__ import annotations

import httpx
import openai
import pytest

from neo_common.config import NeoConfig
from support.clients import openai_client
from support.replica import Replica, descendants

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
KEYS = ("sk-neo-test-3f9c1a7e5b", "sk-neo-test-b24d08c6e1")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Replica:
    r = Replica(["--api-key", ",".join(KEYS), "--protect-metrics"],
                str(tmp_path_factory.mktemp("apikey") / "serve.log"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


def client(replica: Replica, key: str) -> openai.OpenAI:
    return openai_client(replica.url, timeout=120, api_key=key)


def test_without_a_key_or_with_a_wrong_one_gets_401(keyed):
    resp = httpx.post(keyed.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 401
    assert resp.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                      "param": None, "code": "invalid_api_key"}
    assert resp.headers["www-authenticate"] == "Bearer"
    for route in ("/v1/models", "/v1/chat/completions"):
        assert httpx.get(keyed.url + route, headers={"Authorization": "Basic " + KEYS[0]}).status_code == 401
    with pytest.raises(openai.AuthenticationError) as err:
        client(keyed, "sk-wrong").chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(keyed, KEYS[0][:-1]).models.list()  # a prefix of a key is no key


@pytest.mark.parametrize("key", KEYS)
def test_each_key_is_served(keyed, key):
    c = client(keyed, key)
    assert [m.id for m in c.models.list()] == [MODEL]
    out = c.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                    messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens > 0


def test_probes_stay_open_and_metrics_need_the_key(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ready").status_code == 200
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    metrics = httpx.get(keyed.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert metrics.status_code == 200
    rejected = [ln for ln in metrics.text.splitlines() if ln.startswith("neo:request_rejected_total")
                and 'reason="unauthorized"' in ln]
    assert rejected and float(rejected[0].rsplit(" ", 1)[1]) >= 1


def test_the_key_is_in_no_child_command_line(keyed):
    children = descendants(keyed.proc.pid)
    assert len(children) >= 2  # the gateway and the GPU worker at least
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode()
        assert all(key not in argv for key in KEYS), f"pid {pid} shows the API key in its argv"


def test_secret_settings_travel_only_in_the_environment():
    cfg = NeoConfig.from_args(["--api-key", ",".join(KEYS), "--port", "9000"], env={})
    assert cfg.http.api_keys == KEYS
    assert not any(key in arg for arg in cfg.to_args() for key in KEYS) and "--port" in cfg.to_args()
    assert "NEO_API_KEY" not in cfg.to_env()  # to_env feeds ConfigMaps
    assert cfg.secret_env() == {"NEO_API_KEY": ",".join(KEYS)}
    assert NeoConfig.from_args(cfg.to_args(), env=cfg.secret_env()) == cfg
