"""vLLM's server extras: ``POST /tokenize``, ``POST /detokenize``, ``GET /version``, the
``X-Request-Id`` header and CORS (``--allowed-origins`` ...), with vLLM's request and response shapes.

``X-Request-Id``: the client's value (or a fresh one) is kept in the ASGI scope and returned on every
response; the completion routes use it as their id, as vLLM does. It and CORS wrap the whole app
(outside the API-key check, so a browser's preflight is answered, and outside the drain, so every
answer carries the id).
"""

from __future__ import annotations

import importlib.metadata
import uuid
from typing import TYPE_CHECKING, Any, Optional, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.middleware.cors import CORSMiddleware

from neo_gateway.api_models import ChatMessage, error_responses
from neo_gateway.errors import APIError

if TYPE_CHECKING:
    from neo_gateway.async_engine import AsyncEngine
    from neo_gateway.prompt_encoder import PromptEncoder

REQUEST_ID_HEADER = b"x-request-id"
_SCOPE_KEY = "neo.request_id"
_MAX_ID_CHARS = 256   # a longer (or non-printable) client id is replaced, not echoed


def _version() -> str:
    try:
        return importlib.metadata.version("neo-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class RequestIdMiddleware:
    """Takes ``X-Request-Id`` from the request (or makes one) and sets it on the response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers") or () if k == REQUEST_ID_HEADER), b"")
        ok = 0 < len(given) <= _MAX_ID_CHARS and all(0x21 <= c <= 0x7E for c in given)
        rid = given if ok else uuid.uuid4().hex.encode()
        scope[_SCOPE_KEY] = rid.decode("ascii")

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": headers + [(REQUEST_ID_HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def base_request_id(request: Request, body_request_id: str | None = None) -> str:
    """vLLM's ``_base_request_id``: the ``X-Request-Id`` header, else the body's ``request_id``,
    else a fresh one."""
    from_header = request.scope.get(_SCOPE_KEY)   # the header's value, or the one made in its place
    if from_header and request.headers.get("x-request-id"):
        return from_header
    return body_request_id or from_header or uuid.uuid4().hex


def wrap_outermost(app: FastAPI, http) -> None:
    """Put the request id and CORS outside every other layer, including those added to ``app``
    after this call (the drain), by wrapping the stack Starlette builds at the first request."""
    build = app.build_middleware_stack

    def build_with_edges():
        inner = build()
        if http.cors_origins:
            inner = CORSMiddleware(inner, allow_origins=http.cors_origins, allow_methods=http.cors_methods,
                                   allow_headers=http.cors_headers, allow_credentials=http.allow_credentials,
                                   expose_headers=["X-Request-Id"])
        return RequestIdMiddleware(inner)

    app.build_middleware_stack = build_with_edges


# -- bodies (vLLM's TokenizeCompletionRequest / TokenizeChatRequest / DetokenizeRequest) ---------
_BODY = ConfigDict(extra="forbid", strict=True)


class TokenizeCompletionRequest(BaseModel):
    model_config = _BODY

    model: Optional[str] = None
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: Optional[StrictBool] = False


class TokenizeChatRequest(BaseModel):
    model_config = _BODY

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: Optional[StrictBool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    documents: Optional[list[dict[str, Any]]] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(BaseModel):
    model_config = _BODY

    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def install_extra_routes(app: FastAPI, engine: "AsyncEngine", prompts: "PromptEncoder", served_name: str) -> None:
    """Register /tokenize, /detokenize and /version, and wrap the app in the request id and CORS."""
    wrap_outermost(app, engine.config.http)
    version = _version()

    def check_model(name: str | None) -> None:
        if name is not None and name != served_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 404, 413))
    async def tokenize(body: Union[TokenizeCompletionRequest, TokenizeChatRequest]) -> dict:
        check_model(body.model)
        limit = engine.max_model_len
        if isinstance(body, TokenizeChatRequest):
            text = await prompts.render_chat_request(body, lambda b: b.tools)
            ids = await prompts.encode(text, limit, "messages", body.add_special_tokens)
        else:
            ids = await prompts.encode(body.prompt, limit, "prompt", body.add_special_tokens)
        strs = [engine.tokenizer.tok.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 404, 413))
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = engine.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        if len(body.tokens) > engine.max_model_len:
            raise APIError(400, f"at most max_model_len={engine.max_model_len} tokens", "tokens")
        text = await prompts.decode(body.tokens, skip_special_tokens=False)
        return {"prompt": text}

    @app.get("/version", response_model=VersionResponse)
    async def get_version() -> dict:
        return {"version": version}
