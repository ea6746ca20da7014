"""Request bodies of the OpenAI-compatible API (the subset we serve, plus vLLM's extensions).

Pydantic checks types and ranges; :meth:`sampling_params` turns a body into SamplingParams. Fields
clients commonly send but that we do not support are accepted when they ask for the default and
rejected with a 400 naming the field otherwise, so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from neo_gateway.sampling_params import ParamError, SamplingParams


_INT32_MAX = 2**31 - 1


# strict: no lax coercion ("5" or 5.5 as an integer, 0 as a boolean, true as a token id); the bodies
# accept what their OpenAPI schema says and nothing the schema forbids (found by schemathesis)
_STRICT = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: Optional[bool] = False


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
    n: int = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Any] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    user: Optional[str] = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ParamError("n", "only n=1 is supported")
        if self.logprobs not in (None, False, 0):
            raise ParamError("logprobs", "logprobs are not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ParamError(name, f"{name} is not supported")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

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
        )


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. ``prompt`` is text or token ids (a batch of one is accepted too)."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: StrictBool = False
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

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


FinishReason = Optional[Literal["stop", "length", "abort", "error"]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


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
    logprobs: None = None
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


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
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
