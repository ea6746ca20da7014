"""Request bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extensions).

Pydantic checks types and ranges; :meth:`sampling_params` turns a body into SamplingParams. Every
field of either API is declared here; ``api_fields`` says which are honoured, which have no effect
by design, and which are refused with a 400 naming the field unless they ask for the default, so
nothing is silently ignored. Fields of neither API are kept aside (``model_extra``) and logged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neo_common.protocol import MAX_LOGPROBS
from neo_gateway.api_fields import Endpoint, check_refused
from neo_gateway.param_error import ParamError
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.structured_output.spec import STRUCTURED_FIELDS, StructuredOutputSpec, spec_from_fields
from neo_gateway.tool_parsers.choice import ToolRequest


_INT32_MAX = 2**31 - 1
_MAX_N = 128  # choices per request (the waiting-queue capacity bounds a request's sequences too)


# strict: no lax coercion ("5" or 5.5 as an integer, 0 as a boolean, true as a token id); the bodies
# accept what their OpenAPI schema says and nothing the schema forbids (found by schemathesis).
# extra="allow": fields of neither API are ignored with a warning (vLLM's convention), not refused.
_STRICT = ConfigDict(extra="allow", strict=True)
# A field we refuse unless its value asks for the default: any JSON is accepted here, and
# api_fields.check_refused answers 400 for the rest (a wrong type of a refused field is refused too).
_Refused = Optional[Any]


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: Optional[bool] = False
    include_obfuscation: _Refused = None
    continuous_usage_stats: _Refused = None


class _GenerationRequest(BaseModel):
    model_config = _STRICT

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: StrictBool = False
    n: int = Field(default=1, ge=1, le=_MAX_N)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    best_of: Optional[int] = Field(default=None, ge=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extra sampling parameters
    use_beam_search: _Refused = None
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=2.0)
    length_penalty: _Refused = None
    include_stop_str_in_output: StrictBool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    truncate_prompt_tokens: _Refused = None
    allowed_token_ids: _Refused = None
    prompt_logprobs: Optional[int] = Field(default=None, ge=0)
    bad_words: _Refused = None
    # vLLM's extra parameters
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: _Refused = None
    guided_whitespace_pattern: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None
    priority: _Refused = None
    request_id: Optional[str] = Field(default=None, min_length=1, max_length=256)
    logits_processors: _Refused = None
    return_tokens_as_token_ids: Optional[StrictBool] = None
    cache_salt: _Refused = None
    kv_transfer_params: _Refused = None
    vllm_xargs: _Refused = None

    ENDPOINT: ClassVar[Endpoint]
    _LOGPROB_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def wanted_logprobs(self) -> int | None:
        """Top logprobs per generated token (None: none asked)."""
        return None

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    @property
    def sequences_per_prompt(self) -> int:
        """``best_of`` sequences run for each prompt (``n`` of them returned)."""
        return self.best_of or self.n

    def check_supported(self) -> None:
        """400 for the first refused field whose value is not the default (api_fields)."""
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError("best_of", f"best_of must be at least n={self.n}, got {self.best_of}")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ParamError("best_of", "best_of above n cannot be streamed (the best are known only at the end)")
        if self.best_of is not None and self.best_of > _MAX_N:
            raise ParamError("best_of", f"best_of must be at most {_MAX_N}, got {self.best_of}")
        for name in ("prompt_logprobs", *self._LOGPROB_FIELDS):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_LOGPROBS:
                raise ParamError(name, f"{name} must be at most {MAX_LOGPROBS}, got {value}")
        if self.prompt_logprobs is not None and self.stream:
            raise ParamError("prompt_logprobs", "prompt_logprobs are not available with stream=true (as vLLM)")
        found = check_refused(self, self.ENDPOINT)
        if found:
            raise ParamError(*found)

    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id (JSON object keys are strings of integers)."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise ParamError("logit_bias", f"logit_bias keys are token ids, got {key!r}") from None
            out[token] = value
        return out

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def structured_output_spec(self) -> StructuredOutputSpec | None:
        """The request's grammar, from whichever structured-output field carries it (ParamError
        naming the field when it is malformed or a second one is given)."""
        return spec_from_fields({name: getattr(self, name, None) for name in STRUCTURED_FIELDS})

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        self.check_supported()
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            # any top_k at or above the vocabulary disables the filter; clamp so it fits the plan's int32
            top_k=-1 if self.top_k is None else min(self.top_k, _INT32_MAX),
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias_ids(),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.structured_output_spec(),
            # best_of ranks by cumulative logprob: its sequences compute the sampled token's at least
            logprobs=self.wanted_logprobs if self.sequences_per_prompt == self.n else (self.wanted_logprobs or 0),
            prompt_logprobs=self.wanted_prompt_logprobs,
        )


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. ``prompt`` is text or token ids (a batch of one is accepted too)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0)
    echo: StrictBool = False
    suffix: _Refused = None
    add_special_tokens: StrictBool = True
    prompt_embeds: _Refused = None

    ENDPOINT: ClassVar[Endpoint] = Endpoint.COMPLETIONS
    _LOGPROB_FIELDS: ClassVar[tuple[str, ...]] = ("logprobs",)

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """``echo`` with ``logprobs`` returns the prompt's logprobs too (vLLM's rule)."""
        if self.prompt_logprobs is None and self.echo and self.logprobs is not None:
            return self.logprobs
        return self.prompt_logprobs


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool call as chat templates read it: ``arguments`` parsed into an object."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": arguments}}


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    function_call: _Refused = None
    refusal: _Refused = None
    audio: _Refused = None

    def render(self) -> dict[str, Any]:
        """The message as the chat template sees it."""
        out = {"role": self.role, "content": self.text()} | ({"name": self.name} if self.name is not None else {})
        if self.tool_calls:   # templates read arguments as a mapping (transformers' and vLLM's convention)
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ParamError(f"messages.content.{i}", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0)
    # OpenAI fields for features this server does not have (api_fields says which and why)
    audio: _Refused = None
    function_call: _Refused = None
    functions: _Refused = None
    metadata: Optional[dict[str, Any]] = None
    modalities: _Refused = None
    moderation: _Refused = None
    parallel_tool_calls: Optional[StrictBool] = None
    prediction: _Refused = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_options: Optional[dict[str, Any]] = None
    prompt_cache_retention: Optional[str] = None
    reasoning_effort: _Refused = None
    safety_identifier: Optional[str] = None
    service_tier: _Refused = None
    store: _Refused = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    tools: Optional[list[dict[str, Any]]] = None
    verbosity: _Refused = None
    web_search_options: _Refused = None
    # vLLM's chat extras
    echo: _Refused = None
    continue_final_message: StrictBool = False
    documents: Optional[list[dict[str, Any]]] = None
    chat_template: _Refused = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    mm_processor_kwargs: _Refused = None
    structural_tag: Optional[Union[str, dict[str, Any]]] = None
    include_reasoning: Optional[StrictBool] = None

    ENDPOINT: ClassVar[Endpoint] = Endpoint.CHAT

    def tool_request(self) -> ToolRequest:
        """The tools and tool choice, validated (ParamError naming the field)."""
        return ToolRequest.from_fields(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_output_spec(self) -> StructuredOutputSpec | None:
        """``required`` and a named tool choice constrain the output like a schema does."""
        spec = super().structured_output_spec()
        forced = self.tool_request().spec()
        if forced is not None and spec is not None:
            raise ParamError(spec.param, f"{spec.param} cannot be combined with tool_choice {self.tool_choice!r}")
        return forced or spec
    _LOGPROB_FIELDS: ClassVar[tuple[str, ...]] = ("top_logprobs",)

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        super().check_supported()


# -- response bodies: documented in the OpenAPI schema (the routes build them as plain dicts) --------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Union[str, int, None]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: OpenAI's shape, ``param`` naming the offending field where there is one."""

    error: ErrorInfo
    object: Literal["error"] = "error"


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


FinishReason = Optional[Literal["stop", "length", "abort", "error", "tool_calls"]]


class CompletionLogprobs(BaseModel):
    """Per token (with ``echo``, the prompt's first): its text, logprob, the top tokens' logprobs
    (and its own) and its offset in the choice's text; the first prompt token's are null."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (null for the first), token id -> its logprob
PromptLogprobs = Optional[list[Optional[dict[str, PromptLogprob]]]]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason
    prompt_logprobs: PromptLogprobs = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` entries for error statuses, all with the OpenAI error body."""
    words = {400: "Invalid request (the error's param names the field)", 404: "Unknown model",
             413: "Request body too large", 429: "Waiting queue full (Retry-After)",
             499: "Client closed the request", 500: "Generation failed",
             503: "Engine not ready or a worker is down (Retry-After)"}
    return {s: {"model": ErrorResponse, "description": words[s]} for s in statuses}


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason


class CompletionChunk(BaseModel):
    """One SSE event of a streamed completion (``choices`` empty in the final usage event)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Optional[Usage] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (``choices`` empty in the final usage event)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


STREAM_MODELS = (CompletionChunk, ChatCompletionChunk, ErrorResponse)
_REF = "#/components/schemas/{model}"


def stream_components() -> dict[str, dict]:
    """Component schemas the SSE documentation refers to (FastAPI only adds models routes name)."""
    out: dict[str, dict] = {}
    for model in STREAM_MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _sse_event(chunk: type[BaseModel]) -> dict:
    """One server-sent event (OpenAPI 3.2 reading: ``schema`` describes each event): ``data`` is a JSON
    chunk, an error event in OpenAI's error shape, or the final ``[DONE]``."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                                           {"$ref": _REF.format(model="ErrorResponse")}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int, dict]:
    """A generation route: JSON body, or SSE when ``stream`` is true; errors as :func:`error_responses`."""
    ok = {"model": model, "description": "The completion, or with `stream: true` server-sent events "
                                          "(chunks, then `data: [DONE]`)",
          "content": {"text/event-stream": {"schema": _sse_event(chunk)}}}
    return {200: ok, **error_responses(400, 404, 413, 429, 500, 503)}
