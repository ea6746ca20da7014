"""Prompt tokenization and chat templates off the event loop, with a length check before either.

Tokenizing a 16 MB prompt takes seconds and hundreds of MB; on the event loop it froze every other
request, /health included (a liveness probe then kills the pod). Here both run on a small thread
pool (the tokenizer's batch call releases the GIL while it works), and text that cannot fit the
context is refused before it is tokenized whole, where the tokenizer allows a sound bound.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tokenizers import Tokenizer

from neo_common.config import ModelConfig
from neo_common.model_source import resolve
from neo_gateway.chat_template import ChatTemplate
from neo_gateway.errors import APIError
from neo_gateway.param_error import ParamError
from neo_gateway.tokenizer import TextTokenizer

_THREADS = min(4, os.cpu_count() or 1)

# Pre-tokenizers that keep every character of the text (they split it, or map each byte to one
# character); others (Whitespace, BertPreTokenizer, ...) drop characters, so no bound holds.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Metaspace", "UnicodeScripts"}
_SPLITTERS = {"Split", "Punctuation"}  # keep the text unless their behavior is "Removed"


def _keeps_text(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_text(p) for p in spec.get("pretokenizers", ()))
    if kind in _SPLITTERS:
        return spec.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def max_chars_per_token(tok: Tokenizer) -> int | None:
    """The most characters of text one token can stand for, or None where no sound bound exists.

    With no normalizer, a pre-tokenizer that drops nothing and BPE without fused unknowns, every
    token covers the text of one vocabulary entry, whose length (in bytes for byte-level BPE, which
    is at least its length in characters) is at most the longest entry's; added tokens that strip
    the whitespace around them could cover any run of spaces, so they void the bound too.
    """
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or ()):
        return None
    return max(len(entry) for entry in tok.get_vocab(with_added_tokens=True))


class PromptEncoder:
    """Tokenizes prompts and renders chat templates on ``pool``; ``chars_per_token`` (None: no
    bound) lets :meth:`check_length` refuse text longer than ``max_model_len`` tokens could cover.
    ``template``: the chat template (None: the model has none, chat requests get a 400)."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate | None = None,
                 threads: int = _THREADS) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self.chars_per_token = max_chars_per_token(tokenizer.tok)

    @classmethod
    def for_model(cls, tokenizer: TextTokenizer, cfg: ModelConfig) -> "PromptEncoder":
        """The encoder of the served model: its tokenizer's chat template, or ``--chat-template``."""
        source = resolve(cfg)
        return cls(tokenizer, ChatTemplate.load(source.tokenizer_kind, source.tokenizer_path, cfg.chat_template))

    async def _run(self, fn, *args: Any, **kwargs: Any):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def check_length(self, text: str, max_model_len: int, param: str) -> None:
        """400 in vLLM's words when ``text`` has surely more tokens than the context holds."""
        bound = self.chars_per_token
        if bound and max_model_len and len(text) > max_model_len * bound:
            at_least = -(-len(text) // bound)
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                                f"request has at least {at_least} tokens in the {param} ({len(text)} characters). "
                                f"Please reduce the length of the {param}.", param)

    async def encode(self, text: str, max_model_len: int, param: str, add_special_tokens: bool = True) -> list[int]:
        self.check_length(text, max_model_len, param)
        try:
            return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        except (TypeError, ValueError, UnicodeError):  # e.g. a lone surrogate escape ("\ud800") in the JSON
            raise APIError(400, "the text is not valid Unicode (unpaired surrogate?)", param) from None

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._run(self.tokenizer.decode, ids, skip_special_tokens=skip_special_tokens)

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                          continue_final_message: bool = False, tools: list[dict] | None = None,
                          documents: list[dict] | None = None,
                          chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of a chat (chat_template.ChatTemplate.render, off the event loop)."""
        if self.template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions or start the server "
                                "with --chat-template", "messages")
        return await self._run(self.template.render, messages, add_generation_prompt,
                               continue_final_message=continue_final_message, tools=tools, documents=documents,
                               chat_template_kwargs=chat_template_kwargs)

    async def render_chat_request(self, body: Any, tools_of: Callable[[Any], list[dict] | None]) -> str:
        """:meth:`render_chat` of a request with ``messages`` and the template fields, its tools from
        ``tools_of(body)``; an error there or in the template is the request's fault: a 400 naming
        its field (``messages`` unless it names another)."""
        try:
            return await self.render_chat([m.render() for m in body.messages], body.add_generation_prompt,
                                          continue_final_message=body.continue_final_message, tools=tools_of(body),
                                          documents=body.documents, chat_template_kwargs=body.chat_template_kwargs)
        except ParamError as exc:
            raise APIError(400, str(exc), exc.param) from None
        except APIError:
            raise
        except Exception as exc:  # template errors are the request's fault (e.g. role order)
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from None
