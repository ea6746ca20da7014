"""vLLM's extras on a real replica started with ``--chat-template`` and CORS flags: /tokenize (text
and chat, equal to transformers' tokenization of ``apply_chat_template``), /detokenize, /version,
X-Request-Id on every response (and as the completion id), CORS preflight, and the chat options
``continue_final_message`` / ``chat_template_kwargs`` / ``documents`` through the official client."""

from __future__ import annotations

import os

import httpx
import openai
import pytest

from neo_common.model_source import embedded_gguf_path
from support.chat_templates import LLAMA3, TOOL_CHAT, WEATHER_TOOL
from support.clients import openai_client

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
ORIGIN = "https://ui.example"
MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    from support.replica import Replica

    folder = tmp_path_factory.mktemp("extras")
    template = folder / "llama3.jinja"
    template.write_text(LLAMA3)
    r = Replica(["--num-gpu-blocks", "64", "--max-model-len", "512", "--chat-template", str(template),
                 "--allowed-origins", f'["{ORIGIN}"]', "--allow-credentials"], str(folder / "serve.log"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(embedded_gguf_path())
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_tokenize_text_and_chat_as_transformers(replica, ref):
    r = httpx.post(replica.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == ref("Hello world")["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512 and body["token_strs"] == ref.convert_ids_to_tokens(body["tokens"])
    # (assistant tool calls and tool results render as ChatMessage.render passes them: tool calling's part)
    chat = {"messages": TOOL_CHAT[:2], "tools": [WEATHER_TOOL], "chat_template_kwargs": {"date_string": "1 Jan 2025"}}
    r = httpx.post(replica.url + "/tokenize", json=chat)
    assert r.status_code == 200, r.text
    expected = ref.apply_chat_template(TOOL_CHAT[:2], tools=[WEATHER_TOOL], chat_template=LLAMA3,
                                       add_generation_prompt=True, date_string="1 Jan 2025", tokenize=False)
    assert r.json()["tokens"] == ref(expected, add_special_tokens=False)["input_ids"]
    assert r.json()["token_strs"] is None


def test_tokenize_and_detokenize_refuse_bad_input(replica):
    for body, param in (({"prompt": "x", "model": "other"}, "model"),
                        ({"messages": MSG, "continue_final_message": True}, "continue_final_message"),
                        ({"messages": MSG, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")):
        r = httpx.post(replica.url + "/tokenize", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(replica.url + "/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_detokenize_round_trip_and_version(replica):
    ids = httpx.post(replica.url + "/tokenize", json={"prompt": "naïve café 🤖"}).json()["tokens"]
    r = httpx.post(replica.url + "/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "naïve café 🤖"}
    v = httpx.get(replica.url + "/version")
    assert v.status_code == 200 and isinstance(v.json()["version"], str) and v.json()["version"]


def test_request_id_header(replica):
    r = httpx.post(replica.url + "/v1/completions", headers={"X-Request-Id": "my-req-1"},
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-1"
    assert r.json()["id"] == "cmpl-my-req-1"   # vLLM's request id comes from the header
    made = {httpx.get(replica.url + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(made) == 3 and all(len(m) == 32 for m in made)
    bad = httpx.post(replica.url + "/v1/chat/completions", headers={"X-Request-Id": "chat-7"},
                     json={"model": "nope", "messages": MSG})
    assert bad.status_code == 404 and bad.headers["x-request-id"] == "chat-7"   # errors carry it too


def test_cors_preflight_and_simple_requests(replica):
    pre = httpx.options(replica.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert "x-request-id" in pre.headers
    get = httpx.get(replica.url + "/v1/models", headers={"Origin": ORIGIN})
    assert get.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(replica.url + "/v1/models", headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "GET"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_chat_options_through_the_openai_client(replica, ref):
    client = openai_client(replica.url, timeout=120)
    prefill = MSG + [{"role": "assistant", "content": "Hello! My name is"}]
    out = client.chat.completions.create(
        model=MODEL, messages=prefill, max_tokens=3, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "chat_template_kwargs": {"date_string": "1 Jan 2025"}, "documents": [{"title": "t", "text": "x"}]})
    # the prompt the model continued is transformers' rendering, open at the end of the last message
    prompt = ref.apply_chat_template(prefill, chat_template=LLAMA3, continue_final_message=True,
                                     date_string="1 Jan 2025", tokenize=False)
    assert prompt.endswith("Hello! My name is")
    assert out.usage.prompt_tokens == len(ref(prompt, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=prefill, max_tokens=3,
                                       extra_body={"continue_final_message": True})
    assert "continue_final_message" in str(err.value)
