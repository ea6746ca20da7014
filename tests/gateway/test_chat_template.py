"""Chat templates render as transformers' ``apply_chat_template`` renders them: the embedded model's
(GGUF metadata), and a Llama 3 style and a Qwen2 (ChatML with tools) style template written into an
HF tokenizer folder (``chat_template.jinja``) or handed over as ``--chat-template``; tools,
documents, ``continue_final_message`` and ``chat_template_kwargs`` included."""

from __future__ import annotations

import json
import os

import jinja2
import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.chat_template import ChatTemplate, ChatTemplateError
from neo_gateway.param_error import ParamError
from support.chat_templates import LLAMA3, QWEN2, TOOL_CHAT, WEATHER_TOOL

transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b> \"you\""},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "naïve café — 日本語"}],
]


@pytest.fixture(scope="module")
def ref():
    folder, name = os.path.split(embedded_gguf_path())
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def hf_folders(ref, tmp_path_factory):
    """HF tokenizer folders (saved by transformers) whose chat_template.jinja is each family's."""
    out = {}
    for family, template in (("llama3", LLAMA3), ("qwen2", QWEN2)):
        folder = tmp_path_factory.mktemp(family)
        ref.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(template)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        out[family] = str(folder)
    return out


def _hf(ref_tok, messages, **kw) -> str:
    return ref_tok.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_embedded_model_matches_transformers(ref, messages, add_generation_prompt):
    ours = ChatTemplate.load("gguf", embedded_gguf_path())
    assert ours.special_tokens == ref.special_tokens_map
    assert ours.render(messages, add_generation_prompt) == _hf(ref, messages,
                                                               add_generation_prompt=add_generation_prompt)


def test_continue_final_message_matches_transformers(ref):
    messages = CHATS[1] + [{"role": "assistant", "content": "The answer is "}]
    ours = ChatTemplate.load("gguf", embedded_gguf_path())
    expected = _hf(ref, messages, continue_final_message=True)
    assert ours.render(messages, add_generation_prompt=False, continue_final_message=True) == expected
    assert expected.endswith("assistant\nThe answer is ")   # open: no end-of-turn token after it
    with pytest.raises(ParamError) as err:
        ours.render(messages, add_generation_prompt=True, continue_final_message=True)
    assert err.value.param == "continue_final_message"


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
@pytest.mark.parametrize("messages,tools", [(CHATS[1], None), (TOOL_CHAT, [WEATHER_TOOL]),
                                            (TOOL_CHAT[1:], [WEATHER_TOOL])])
def test_other_families_match_transformers(hf_folders, family, messages, tools):
    ref_tok = transformers.AutoTokenizer.from_pretrained(hf_folders[family])
    ours = ChatTemplate.load("hf", hf_folders[family])
    for add in (True, False):
        kwargs = {"date_string": "26 Jul 2024"} if family == "llama3" else {}
        expected = _hf(ref_tok, messages, tools=tools, add_generation_prompt=add, **kwargs)
        assert ours.render(messages, add, tools=tools, chat_template_kwargs=kwargs) == expected
    if tools:
        assert "get_weather" in expected and "Zürich <b>" in expected, "tools and non-ASCII as JSON, unescaped"


def test_strftime_now_and_kwargs_reach_the_template(hf_folders):
    ref_tok = transformers.AutoTokenizer.from_pretrained(hf_folders["llama3"])
    ours = ChatTemplate.load("hf", hf_folders["llama3"])
    # no date_string: the template asks strftime_now for today's date
    assert ours.render(CHATS[0]) == _hf(ref_tok, CHATS[0], add_generation_prompt=True)
    # kwargs may override the request's own options, as vLLM lets them
    text = ours.render(CHATS[0], True, chat_template_kwargs={"add_generation_prompt": False, "date_string": "X"})
    assert "Today Date: X" in text and not text.endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(ParamError) as err:
        ours.render(CHATS[0], chat_template_kwargs={"tokenize": True})
    assert err.value.param == "chat_template_kwargs"


def test_override_file_and_raise_exception(ref, tmp_path):
    path = tmp_path / "qwen.jinja"
    path.write_text(QWEN2)
    ours = ChatTemplate.load("gguf", embedded_gguf_path(), str(path))
    assert ours.render(TOOL_CHAT[1:], tools=[WEATHER_TOOL]) == _hf(ref, TOOL_CHAT[1:], tools=[WEATHER_TOOL],
                                                                    chat_template=QWEN2, add_generation_prompt=True)
    with pytest.raises(jinja2.TemplateError, match="needs a user message"):
        ours.render([{"role": "system", "content": "only me"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate.load("gguf", embedded_gguf_path(), str(tmp_path / "missing.jinja"))


def test_documents_and_named_templates(ref, tmp_path):
    rag = ("{% for d in documents %}[{{ d.title }}] {{ d.text }}\n{% endfor %}"
           "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    docs = [{"title": "T1", "text": "first"}, {"title": "T2", "text": "second"}]
    ours = ChatTemplate({"default": "{{ messages[0].content }}", "tool_use": "TOOLS {{ tools | length }}",
                         "rag": rag}, {})
    assert ours.render(CHATS[0], tools=[WEATHER_TOOL]) == "TOOLS 1"     # transformers picks tool_use
    assert ours.render(CHATS[0]) == CHATS[0][0]["content"]
    assert ChatTemplate({"default": rag}, {}).render(CHATS[0], documents=docs) == _hf(
        ref, CHATS[0], documents=docs, chat_template=rag)


def test_sandbox_refuses_python_internals():
    escape = ChatTemplate({"default": "{{ messages.__class__.__mro__ }}"}, {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        escape.render(CHATS[0])
    ns = ChatTemplate({"default": "{% set n = namespace(_x=1) %}{{ n._x }}"}, {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        ns.render(CHATS[0])
