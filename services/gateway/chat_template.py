"""Chat templates rendered as Hugging Face ``transformers`` renders them.

Templates on the Hub are written against transformers' Jinja environment, so the same text must come
out here: a sandboxed immutable environment with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension and the ``{% generation %}`` tag, a ``tojson`` that does not HTML-escape,
``raise_exception``, ``strftime_now``, a ``dict`` and a ``namespace`` that refuse dunder attributes,
and the variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
named special tokens (``bos_token``, ``eos_token``, ...) and any ``chat_template_kwargs``.

The template comes from ``--chat-template`` (a file, or the template itself), else the model's
``chat_template.jinja``, ``tokenizer_config.json`` (one template or named ones: ``tool_use`` is taken
when tools are given, as transformers does) or GGUF metadata.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from neo_common.gguf_file import open_gguf
from neo_gateway.param_error import ParamError

# the tokenizer attributes transformers hands every template (its special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GGUF_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                   "unk_token": "tokenizer.ggml.unknown_token_id", "sep_token": "tokenizer.ggml.seperator_token_id",
                   "pad_token": "tokenizer.ggml.padding_token_id", "cls_token": "tokenizer.ggml.cls_token_id",
                   "mask_token": "tokenizer.ggml.mask_token_id"}
# chat_template_kwargs that would replace what the request itself says (vLLM refuses them too)
_RESERVED_KWARGS = ("chat_template", "tokenize", "messages")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# a message's reasoning: transformers fills the first name (and ``thinking``) from whichever is set
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The model has no usable template, or the configured one cannot be read or compiled."""


# -- the environment (transformers' chat_template_utils._cached_compile_jinja_template) ----------
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering
    only needs its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` in a template, without the type itself (no attribute access to break out)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed attributes (CPython internals)."""

    def __init__(*args, **kwargs):   # Jinja's signature trick, so ``namespace(self=...)`` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes "
                                                  f"on a namespace ({name!r})")


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


# -- the template of a model ---------------------------------------------------------------------
class ChatTemplate:
    """A model's chat template(s) and the special tokens its templates see.

    ``templates``: name -> Jinja source (``default`` for a single template; ``tool_use`` and others
    where the tokenizer names several). ``special_tokens``: transformers' ``special_tokens_map``.
    """

    def __init__(self, templates: Mapping[str, str], special_tokens: Mapping[str, str]) -> None:
        if not templates:
            raise ChatTemplateError("no chat template")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens)
        for source in self.templates.values():
            try:
                compile_template(source)
            except jinja2.TemplateSyntaxError as exc:
                raise ChatTemplateError(f"the chat template does not compile: {exc}") from None

    # construction
    @classmethod
    def load(cls, model_kind: str, model_path: str, override: str = "") -> "ChatTemplate | None":
        """The template of the tokenizer at ``model_path`` ("hf" folder or "gguf" file), or
        ``override`` (``--chat-template``: a file path or the template text); None if there is none."""
        special = (_gguf_special_tokens(model_path) if model_kind == "gguf"
                   else _hf_special_tokens(model_path))
        if override:
            return cls({"default": read_template_arg(override)}, special)
        templates = (_gguf_templates(model_path) if model_kind == "gguf" else _hf_templates(model_path))
        return cls(templates, special) if templates else None

    def pick(self, tools: Any) -> str:
        """transformers' choice among named templates: ``tool_use`` with tools, else ``default``."""
        if len(self.templates) == 1:
            return next(iter(self.templates.values()))
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ChatTemplateError(f"the tokenizer has named chat templates ({', '.join(self.templates)}) "
                                "and none is called 'default'")

    # use
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None,
               documents: list[dict] | None = None, chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt text, as ``tokenizer.apply_chat_template(..., tokenize=False)`` returns it.

        ``chat_template_kwargs`` may also set ``add_generation_prompt``, ``continue_final_message``,
        ``tools`` and ``documents`` (vLLM lets them override the request's); the rest become template
        variables beside the special tokens (and may replace them, as in transformers)."""
        extra = dict(chat_template_kwargs or {})
        reserved = [k for k in _RESERVED_KWARGS if k in extra]
        if reserved:
            raise ParamError("chat_template_kwargs", f"chat_template_kwargs must not set {', '.join(reserved)}")
        add_generation_prompt = bool(extra.pop("add_generation_prompt", add_generation_prompt))
        continue_final_message = bool(extra.pop("continue_final_message", continue_final_message))
        tools = extra.pop("tools", tools)
        documents = extra.pop("documents", documents)
        if continue_final_message and add_generation_prompt:
            raise ParamError("continue_final_message", "Cannot set both `continue_final_message` and "
                                                       "`add_generation_prompt` to True.")
        if documents is not None and any(not isinstance(d, dict) for d in documents):
            raise ParamError("documents", "documents must be a list of objects (e.g. with 'title' and 'text')")
        source = self.pick(tools)
        # transformers drops None-valued keys (content=None, tool_calls=None): templates test presence
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        final = None
        if continue_final_message:
            final = chat[-1].get("content") if chat else None
            if not isinstance(final, str):
                raise ParamError("continue_final_message", "continue_final_message needs a last message with "
                                                           "text content to continue")
            if "content" not in source:
                raise ParamError("continue_final_message", "this model's chat template does not read the "
                                                           "message content it would continue")
            chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
        variables = {**self.special_tokens, **extra}
        text = compile_template(source).render(messages=chat, tools=tools, documents=documents,
                                               add_generation_prompt=add_generation_prompt, **variables)
        if final is not None:
            text = _cut_at_tag(text, final)
        return text


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _cut_at_tag(text: str, final: str) -> str:
    """Everything up to the end of the final message (transformers' continue_final_message)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ParamError("continue_final_message", "the chat template drops part of the final message, "
                                                   "so it cannot be continued")
    at = text.rindex(tag)
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()   # the template trimmed the message's trailing space


def read_template_arg(value: str) -> str:
    """``--chat-template``: a file holding the template (.jinja, or a .json with ``chat_template``)
    or, as vLLM accepts, the template itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if value.endswith(".json"):
            loaded = json.loads(text)
            text = loaded.get("chat_template", text) if isinstance(loaded, dict) else text
        return text
    if "{{" in value or "{%" in value:
        return value
    raise ChatTemplateError(f"--chat-template {value!r}: no such file, and it does not look like a template")


def _hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hf_templates(folder: str) -> dict[str, str]:
    """chat_template.jinja (what transformers saves since 4.43) first, then tokenizer_config.json,
    then a processor's chat_template.json."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return {"default": f.read()}
    template = _hf_config(folder).get("chat_template")
    if template is None:
        json_path = os.path.join(folder, "chat_template.json")
        if os.path.exists(json_path):
            with open(json_path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
    if isinstance(template, list):   # named templates
        return {t["name"]: t["template"] for t in template if "name" in t and "template" in t}
    if isinstance(template, dict):
        return dict(template)
    return {"default": template} if isinstance(template, str) else {}


def _hf_special_tokens(folder: str) -> dict[str, str]:
    cfg = _hf_config(folder)
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


def _gguf_templates(path: str) -> dict[str, str]:
    meta = open_gguf(path).metadata
    out = {"default": meta["tokenizer.chat_template"]} if meta.get("tokenizer.chat_template") else {}
    for name in meta.get("tokenizer.chat_templates") or ():   # named ones: tokenizer.chat_template.NAME
        if meta.get(f"tokenizer.chat_template.{name}"):
            out[name] = meta[f"tokenizer.chat_template.{name}"]
    return out


def _gguf_special_tokens(path: str) -> dict[str, str]:
    meta = open_gguf(path).metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in _GGUF_TOKEN_IDS.items():
        token_id = meta.get(key)
        if token_id is not None and 0 <= token_id < len(tokens):
            out[name] = tokens[token_id]
    return out
