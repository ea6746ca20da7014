"""Every request field of the OpenAI Completions and Chat Completions APIs and of vLLM's extra
parameters, and what this server does with each: honoured, accepted with no effect by design, or
refused with a 400 naming it unless the value asks for the default behaviour.

The schema lists are committed data (the OpenAI API reference / the ``openai`` client's request
types, and vLLM's ``CompletionRequest`` / ``ChatCompletionRequest``); a unit test checks that every
declared model field has a status here, so a field added later cannot be silently dropped. Fields in
neither API are ignored with one warning per request, as vLLM does. The README's "OpenAI API fields"
table is generated from this module (:func:`markdown_table`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from pydantic import BaseModel


class Endpoint(str, enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


class FieldStatus(str, enum.Enum):
    HONOURED = "honoured"
    NO_EFFECT = "accepted, no effect by design"
    REFUSED = "refused"


# -- the schemas (data) ---------------------------------------------------------------------------
OPENAI_COMPLETIONS = ("model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                      "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                      "suffix", "temperature", "top_p", "user")
OPENAI_CHAT = ("messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
               "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n",
               "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
               "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
               "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
               "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
               "web_search_options")
_VLLM_SAMPLING = ("use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
                  "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
                  "spaces_between_special_tokens", "truncate_prompt_tokens", "allowed_token_ids",
                  "prompt_logprobs", "bad_words")
_VLLM_COMMON_EXTRA = ("add_special_tokens", "response_format", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs",
                      "priority", "request_id", "logits_processors", "return_tokens_as_token_ids", "cache_salt",
                      "kv_transfer_params", "vllm_xargs")
VLLM_COMPLETIONS_EXTRA = _VLLM_SAMPLING + _VLLM_COMMON_EXTRA + ("prompt_embeds",)
VLLM_CHAT_EXTRA = _VLLM_SAMPLING + _VLLM_COMMON_EXTRA + (
    "best_of", "echo", "add_generation_prompt", "continue_final_message", "documents", "chat_template",
    "chat_template_kwargs", "mm_processor_kwargs", "structural_tag", "reasoning_effort", "include_reasoning")
# nested objects: a chat message (all roles' fields) and stream_options
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio")
STREAM_OPTIONS_FIELDS = ("include_usage", "include_obfuscation", "continuous_usage_stats")


def schema_fields(endpoint: Endpoint) -> tuple[str, ...]:
    """The top-level request fields of ``endpoint`` in either API, in a stable order."""
    both = (OPENAI_COMPLETIONS + VLLM_COMPLETIONS_EXTRA if endpoint is Endpoint.COMPLETIONS
            else OPENAI_CHAT + VLLM_CHAT_EXTRA)
    return tuple(dict.fromkeys(both))


# -- the policy -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Refusal:
    """A field we do not implement: accepted only with a value that asks for the default behaviour
    (``neutral``; None, an empty list or object always do), else a 400 naming it. ``equal_to``: the
    value is also neutral when it equals that other field's (``best_of`` == ``n``)."""

    reason: str
    neutral: tuple = ()
    equal_to: str | None = None

    def allows(self, value: Any, body: Any = None) -> bool:
        if value is None or (isinstance(value, (list, dict)) and not value):
            return True
        if self.equal_to is not None and body is not None and _same(value, getattr(body, self.equal_to)):
            return True
        return any(_same(value, n) for n in self.neutral)


def _same(value: Any, neutral: Any) -> bool:
    """Equality that keeps JSON's booleans apart from numbers (true is not 1)."""
    if isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return value == neutral


_NO_TOOLS = "the deprecated `functions` / `function_call` are not accepted; use `tools` / `tool_choice`"

# fields refused in both endpoints (a field missing from an endpoint's schema is not checked there)
_REFUSED: dict[str, Refusal] = {
    "allowed_token_ids": Refusal("allowed_token_ids is not implemented yet"),
    "bad_words": Refusal("bad_words is not implemented yet"),
    "use_beam_search": Refusal("beam search is not implemented", (False,)),
    "length_penalty": Refusal("length_penalty only applies to beam search, which is not implemented", (1, 1.0)),
    "truncate_prompt_tokens": Refusal("prompt truncation is not implemented; send a shorter prompt"),
    "guided_decoding_backend": Refusal("the grammar backend is llguidance", ("auto", "guidance", "llguidance")),
    "priority": Refusal("requests are scheduled first come, first served (no priority scheduling)", (0,)),
    "logits_processors": Refusal("custom logits processors are not loaded by this server"),
    "cache_salt": Refusal("per-request prefix-cache salts are not implemented"),
    "kv_transfer_params": Refusal("disaggregated prefill (KV transfer) is not implemented"),
    "vllm_xargs": Refusal("this server has no custom extensions that read vllm_xargs"),
    "prompt_embeds": Refusal("prompt embeddings are not accepted; send text or token ids"),
    "suffix": Refusal("suffix (insertion) is not supported by this model's completions", ("",)),
    "functions": Refusal(_NO_TOOLS),
    "function_call": Refusal(_NO_TOOLS, ("none", "auto")),
    "audio": Refusal("audio output is not supported (text models only)"),
    "modalities": Refusal("only text output is supported", (["text"],)),
    "moderation": Refusal("moderation is not implemented"),
    "prediction": Refusal("predicted outputs are not implemented"),
    "reasoning_effort": Refusal("the served model is not a reasoning model"),
    "verbosity": Refusal("the served model is not a reasoning model"),
    "web_search_options": Refusal("web search is not available"),
    "store": Refusal("nothing is stored: there is no stored-completions API", (False,)),
    "service_tier": Refusal("there is one service tier", ("auto", "default")),
    "chat_template": Refusal("per-request chat templates are not accepted; the model's template (or the "
                                     "server's --chat-template) is used"),
    "mm_processor_kwargs": Refusal("multimodal input is not supported (text models only)"),
    "include_obfuscation": Refusal("stream obfuscation is not implemented", (False,)),
    "continuous_usage_stats": Refusal("usage is sent in the final chunk only (include_usage)", (False,)),
    # message fields
    "tool_calls": Refusal(_NO_TOOLS),
    "tool_call_id": Refusal(_NO_TOOLS),
    "refusal": Refusal("assistant refusal messages are not rendered by the chat template"),
}
# endpoint-specific meanings of the same name
_REFUSED_COMPLETIONS = dict(_REFUSED)
_REFUSED_CHAT = {**_REFUSED,
                 "echo": Refusal("echo (prepending the last message of the same role) is not implemented",
                                 (False,))}

_NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring; vLLM ignores it too",
    "safety_identifier": "an end-user id for the provider's abuse monitoring",
    "metadata": "tags for stored completions; nothing is stored",
    "prompt_cache_key": "prefix caching is automatic (exact block-hash matches)",
    "prompt_cache_options": "prefix caching is automatic (exact block-hash matches)",
    "prompt_cache_retention": "prefix caching is automatic; cached blocks live until the pool needs them",
    "include_reasoning": "no reasoning parser: responses never carry reasoning content",
}

_HONOURED_NOTES: dict[str, str] = {
    "prompt": "text, token ids, or a list of either: one choice per prompt (and per `n`), `index` in order",
    "n": "up to 128 independent sequences (with a `seed`, choice i uses seed + i); once the first has "
         "prefilled the prompt, the others take its full KV blocks from the GPU prefix cache",
    "min_tokens": "stop tokens and stop strings do not end the first `min_tokens` tokens (they are kept "
                  "as ordinary tokens; vLLM masks the stop tokens' logits instead)",
    "spaces_between_special_tokens": "as vLLM's fast detokenizer (it matters only between two added "
                                     "tokens kept in the text)",
    "presence_penalty": "in [-2, 2], on the device over the generated tokens (vLLM's formula, greedy too)",
    "frequency_penalty": "in [-2, 2], on the device: minus penalty x the token's count in the output",
    "repetition_penalty": "in (0, 2], on the device over prompt and output tokens (vLLM's formula)",
    "min_p": "on the device, on the tempered probabilities before top-k/top-p (vLLM's order)",
    "logit_bias": "token id -> value in [-100, 100], added on the device before sampling (greedy too)",
    "include_stop_str_in_output": "keeps a matched stop string and a stop token's text (else both are "
                                  "left out, as vLLM does)",
    "logprobs": "completions: an integer in [0, 20], the sampled token's logprob and the top that many "
                "(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); chat: `true` for `content` "
                "logprobs. Raw: log-softmax of the model's logits before bias, penalties and temperature "
                "(vLLM's default); computed on the device, only for the rows that ask; streamed with the "
                "text they belong to",
    "top_logprobs": "0..20, with `logprobs: true`",
    "echo": "the prompt is prepended to the text; with `logprobs`, its tokens' logprobs too (the first "
            "null)",
    "prompt_logprobs": "0..20, vLLM's `prompt_logprobs` (not with `stream`); such a request computes its "
                       "whole prompt (no prefix-cache hit)",
    "best_of": "at least `n`, at most 128, not above `n` with `stream`: runs `best_of` sequences and returns the `n` "
               "with the highest cumulative logprob, best first; they share the prompt's blocks as `n` does",
    "return_tokens_as_token_ids": "logprob tokens as `token_id:<id>`",
    "response_format": "`text`, `json_object`, `json_schema` (strict or not: the schema always binds), "
                       "vLLM's `structural_tag` (`structures` of `begin`/`schema`/`end` and `triggers`: free text "
                       "in which a trigger starts a structure; its `format` form is a 400); compiled with "
                       "llguidance (cached, off the event loop), the mask applied on the device before sampling; "
                       "JSON without free whitespace; an invalid schema is a 400",
    "guided_json": "a JSON schema (object or string), as `response_format` `json_schema`",
    "guided_regex": "the output matches the regex",
    "guided_choice": "the output is one of the strings",
    "guided_grammar": "GBNF/EBNF (llama.cpp's) or Lark",
    "guided_whitespace_pattern": "JSON only: the whitespace allowed between JSON tokens (a regex)",
    "structured_outputs": "vLLM's form: one of `json`, `regex`, `choice`, `grammar`, `json_object`, "
                          "`structural_tag`; `whitespace_pattern`, `disable_any_whitespace` (false: JSON's "
                          "whitespace allowed), `disable_additional_properties`; `backend` auto/guidance/llguidance "
                          "(others refused); `disable_fallback` no effect (there is no other backend)",
    "structural_tag": "vLLM's structural tag (its JSON text or the object), as `response_format` "
                      "`structural_tag`",
    "tools": "function tools, passed to the chat template as `tools`",
    "tool_choice": "`none`, `auto` (calls found by `--tool-call-parser`: `hermes` or `llama3_json`), "
                   "`required` or a named function (both enforced by a structured-output grammar); calls "
                   "come back as `tool_calls` with `finish_reason: tool_calls` (streamed as vLLM does: a "
                   "call's `id`, `type`, `function.name` and the arguments written so far first, then its "
                   "`function.arguments` in pieces "
                   "as the model writes them; arguments are the JSON text the model wrote); a function not "
                   "among the tools is a 400",
    "parallel_tool_calls": "false: at most one call",
    "tool_calls": "an assistant message's calls, rendered by the chat template (arguments as an object)",
    "tool_call_id": "a tool message's call id, passed to the chat template",
    "max_tokens": "default 16 (completions) or the rest of the context (chat)",
    "max_completion_tokens": "taken when `max_tokens` is not set",
    "top_k": "-1 disables",
    "stream_options": "`include_usage`",
    "request_id": "the response id becomes `cmpl-`/`chatcmpl-` + it",
    "add_special_tokens": "completions default true, chat false (the template adds them)",
    "name": "passed to the chat template with the message",
    "messages": "text content parts; roles system, developer, user, assistant, tool",
    "add_generation_prompt": "as transformers' `apply_chat_template` (the model's Hugging Face chat template, "
                             "or `--chat-template`)",
    "continue_final_message": "the last message is left open for the model to continue (not with "
                              "`add_generation_prompt`)",
    "documents": "passed to the chat template as `documents`",
    "chat_template_kwargs": "extra chat-template variables; may also set `add_generation_prompt`, "
                            "`continue_final_message`, `tools`, `documents`",
}
_HONOURED = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "stream", "stream_options", "include_usage",
             "add_generation_prompt", "add_special_tokens", "request_id", "role", "content", "name", "n",
             "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
             "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
             "guided_whitespace_pattern", "structured_outputs", "structural_tag",
             "tools", "tool_choice", "parallel_tool_calls", "tool_calls", "tool_call_id",
             "min_p", "logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "continue_final_message", "documents", "chat_template_kwargs",
             "logprobs", "top_logprobs", "prompt_logprobs", "best_of", "return_tokens_as_token_ids")
_HONOURED_IN = {Endpoint.COMPLETIONS: ("echo",), Endpoint.CHAT: ()}   # one endpoint's meaning of the name


def refusals(endpoint: Endpoint) -> dict[str, Refusal]:
    return _REFUSED_COMPLETIONS if endpoint is Endpoint.COMPLETIONS else _REFUSED_CHAT


def status(endpoint: Endpoint, name: str) -> FieldStatus | None:
    """What ``endpoint`` does with the field (top level or nested) called ``name``; None: unknown."""
    if name in _HONOURED or name in _HONOURED_IN[endpoint]:
        return FieldStatus.HONOURED
    if name in _NO_EFFECT:
        return FieldStatus.NO_EFFECT
    if name in refusals(endpoint):
        return FieldStatus.REFUSED
    return None


def check_refused(body: BaseModel, endpoint: Endpoint, prefix: str = ""):
    """The first refused field of ``body`` (nested models and lists of them too) whose value does
    not ask for the default, as ``(param, message)``; None when there is none."""
    rules = refusals(endpoint)
    for name in type(body).model_fields:
        value = getattr(body, name)
        rule = rules.get(name)
        if rule is not None and status(endpoint, name) is FieldStatus.REFUSED and not rule.allows(value, body):
            return f"{prefix}{name}", f"{prefix}{name} is not supported: {rule.reason}"
        for key, item in _children(value):
            found = check_refused(item, endpoint, f"{prefix}{name}{key}.")
            if found:
                return found
    return None


def unknown_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Fields of ``body`` (and of its nested models) that belong to neither API: ignored."""
    out = [f"{prefix}{k}" for k in (body.model_extra or {})]
    for name in type(body).model_fields:
        for key, item in _children(getattr(body, name)):
            out += unknown_fields(item, f"{prefix}{name}{key}.")
    return out


def _children(value: Any):
    if isinstance(value, BaseModel):
        yield "", value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, BaseModel):
                yield f".{i}", item


# -- the README table -----------------------------------------------------------------------------
BEGIN, END = "<!-- api-fields-table:begin -->", "<!-- api-fields-table:end -->"


def _describe(endpoint: Endpoint, name: str) -> str:
    st = status(endpoint, name)
    if st is FieldStatus.HONOURED:
        note = _HONOURED_NOTES.get(name)
        return "honoured" + (f": {note}" if note else "")
    if st is FieldStatus.NO_EFFECT:
        return f"accepted, no effect: {_NO_EFFECT[name]}"
    assert st is FieldStatus.REFUSED, name
    rule = refusals(endpoint)[name]
    shown = [v for i, v in enumerate(rule.neutral) if not any(_same(v, w) for w in rule.neutral[:i])]
    ok = [_json(v) for v in shown] + ([f"equal to `{rule.equal_to}`"] if rule.equal_to else [])
    unless = f" unless {' or '.join(ok)}" if ok else " unless null or empty"
    return f"**refused**{unless}: {rule.reason}"


def _json(value: Any) -> str:
    import json
    return f"`{json.dumps(value)}`"


def markdown_table() -> str:
    rows = ["| Field | `/v1/completions` | `/v1/chat/completions` |", "|---|---|---|"]
    comp, chat = set(schema_fields(Endpoint.COMPLETIONS)), set(schema_fields(Endpoint.CHAT))
    names = list(dict.fromkeys(schema_fields(Endpoint.COMPLETIONS) + schema_fields(Endpoint.CHAT)))
    for name in names:
        cells = [_describe(e, name) if name in fields else "—"
                 for e, fields in ((Endpoint.COMPLETIONS, comp), (Endpoint.CHAT, chat))]
        if cells[0] == cells[1]:
            cells[1] = "same"
        rows.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    for group, fields in (("messages[].", MESSAGE_FIELDS), ("stream_options.", STREAM_OPTIONS_FIELDS)):
        for name in fields:
            text = _describe(Endpoint.CHAT, name)
            rows.append(f"| `{group}{name}` | {text if group == 'stream_options.' else '—'} | "
                        f"{'same' if group == 'stream_options.' else text} |")
    return "\n".join(rows)
