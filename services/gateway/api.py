"""HTTP routes: OpenAI-compatible completions and chat (streaming or not), models, health."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from neo_common.engine_core_protocol import CORE_SILENCE_S
from neo_gateway.api_fields import unknown_fields
from neo_gateway.api_models import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                    CompletionChunk, CompletionRequest, CompletionResponse, ModelList,
                                    generation_responses, stream_components)
from neo_gateway.async_engine import AsyncEngine, EngineOverloaded, EngineUnavailable, RequestOutput, RequestStream
from neo_gateway.auth import ApiKeyAuth
from neo_gateway.choices import Choice, ChoiceStreams, best_of, choices_of
from neo_gateway.errors import APIError, install_handlers
from neo_gateway.fast_json import FastJSONResponse, sse_event
from neo_gateway.extra_routes import base_request_id, install_extra_routes
from neo_gateway.http_limits import BodyGuard, RejectionCounter
from neo_gateway.json_route import FastJsonRoute
from neo_gateway.logprobs import LogprobFormatter, PendingLogprobs
from neo_gateway.metrics import GatewayMetrics
from neo_gateway.prompt_encoder import PromptEncoder
from neo_gateway.param_error import ParamError
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.sequence import FinishReason
from neo_gateway.tool_parsers import ToolOutput


log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25


def _openapi_without_422(app: FastAPI):
    """FastAPI documents a 422 for every body; invalid bodies get a 400 here (errors.py), so drop it.
    Also adds the SSE chunk schemas the streaming responses refer to."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components.update({k: v for k, v in stream_components().items() if k not in components})
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(engine: AsyncEngine, served_name: str) -> FastAPI:
    app = FastAPI(title="NEO serving stack", version="0.1.0")
    app.router.route_class = FastJsonRoute  # before any route: large JSON bodies parse in ~5 ms, not ~50
    app.openapi = _openapi_without_422(app)
    install_handlers(app)
    http = engine.config.http
    created = int(time.time())
    metrics = GatewayMetrics(engine, served_name)
    app.state.metrics = metrics  # the HTTP server's own limits count their rejections here too
    engine.finished_hooks.append(metrics.observe_finished)
    # Outermost last: rejections are counted whichever layer answers; the API key is checked before
    # any body is read.
    app.add_middleware(BodyGuard, limit=http.max_request_bytes, timeout_s=http.body_timeout_s)
    if http.api_keys:
        app.add_middleware(ApiKeyAuth, keys=http.api_keys, protect_metrics=http.protect_metrics)
    app.add_middleware(RejectionCounter, observe=metrics.observe_rejected)
    prompts = PromptEncoder.for_model(engine.tokenizer, engine.config.model)
    install_extra_routes(app, engine, prompts, served_name)  # /tokenize, /detokenize, /version, X-Request-Id, CORS

    def close(stream: RequestStream) -> None:
        """End a request's stream; one the client left before its end is counted as aborted."""
        seq = stream.req
        left_early = not seq.is_finished
        stream.abort()
        if left_early and seq.finish_reason is FinishReason.ABORT:
            metrics.observe_finished(seq)

    def check_model(name: str) -> None:
        if name != served_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def check_fields(body) -> None:
        """Refused fields with a non-default value: 400 naming the first. Fields of neither API:
        ignored, one warning per request (vLLM's convention)."""
        try:
            body.check_supported()
        except ParamError as exc:
            raise APIError(400, str(exc), exc.param) from None
        ignored = unknown_fields(body)
        if ignored:
            log.warning("fields not in the OpenAI or vLLM API were ignored: %s", ", ".join(ignored))

    def check_ready() -> None:
        if not engine.ready:
            raise APIError(503, "the engine is not ready (a worker is down or still loading)",
                           headers={"Retry-After": "5"})

    def plan_request(prompt_ids: list[int], params_of, prompt_param: str) -> SamplingParams:
        """Validate lengths against the context; build SamplingParams (vLLM's wording on overflow)."""
        limit = engine.max_model_len
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", prompt_param)
        vocab = engine.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", prompt_param)
        try:
            params = params_of(max(1, limit - len(prompt_ids)))
        except ParamError as exc:
            raise APIError(400, str(exc), exc.param) from None
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        cap = engine.config.http.max_tokens_limit
        if cap and params.max_tokens > cap:
            raise APIError(400, f"max_tokens must be at most {cap}", "max_tokens")
        if len(params.stop) > engine.config.http.max_stop_strings:
            raise APIError(400, f"at most {engine.config.http.max_stop_strings} stop strings", "stop")
        if any(len(s) > engine.config.http.max_stop_length for s in params.stop):
            raise APIError(400, f"stop strings are limited to {engine.config.http.max_stop_length} characters", "stop")
        total = len(prompt_ids) + params.max_tokens
        if len(prompt_ids) >= limit or total > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{total} tokens ({len(prompt_ids)} in the messages, {params.max_tokens} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           "max_tokens" if len(prompt_ids) < limit else prompt_param)
        why = engine.check_capacity(total)
        if why:
            raise APIError(400, why, "max_tokens")
        return params

    def submit(request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        try:
            return engine.submit(request_id, prompt_ids, params)
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None
        except EngineOverloaded as exc:
            raise APIError(429, f"server overloaded: {exc}", headers={"Retry-After": "1"}) from None

    async def start(rid: str, groups: list[list[Choice]]) -> ChoiceStreams:
        """Run a request's choices; refused as a whole when the queue cannot take all of them."""
        total = sum(len(g) for g in groups)
        cfg = engine.config.scheduler
        cap = cfg.max_num_seqs + cfg.max_waiting
        if total > cap:
            raise APIError(400, f"the request asks for {total} sequences (prompts x n); this server queues at most "
                                f"{cap}", "n")
        if total > 1 and len(engine.requests) + total > cap:
            raise APIError(429, f"server overloaded: {total} sequences do not fit the queue now",
                           headers={"Retry-After": "1"})
        for spec in {c.params.structured_outputs for g in groups for c in g} - {None}:
            try:   # compiled (or found in the cache) off the event loop, before any choice runs
                await engine.structured.prepare(spec)
            except ParamError as exc:
                raise APIError(400, str(exc), exc.param) from None
        many = total > 1
        choices = ChoiceStreams(groups, lambda c: submit(f"{rid}-{c.index}" if many else rid, c.prompt_ids, c.params),
                                close)
        await choices.start()
        return choices

    async def collect(choices: ChoiceStreams, request: Request) -> dict[int, RequestOutput]:
        """Every choice's whole text and final state; aborts them if the client goes away while waiting."""
        async def drain() -> dict[int, RequestOutput]:
            texts: dict[int, str] = {}
            logprobs = PendingLogprobs()
            final: dict[int, RequestOutput] = {}
            async for index, out in choices:
                texts[index] = texts.get(index, "") + out.text
                logprobs.add(index, out)
                if out.finished:
                    final[index] = RequestOutput(texts[index], [], True, out.finish_reason, out.prompt_tokens,
                                                 out.completion_tokens, out.error, logprobs.take(index),
                                                 logprobs.prompt.get(index), out.cumulative_logprob)
            return final

        task = asyncio.ensure_future(drain())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client closed the request")
        finally:
            await choices.aclose()
        final = task.result()
        failed = [out.error for out in final.values() if out.error]
        if failed:
            raise APIError(500, f"generation failed: {failed[0]}")
        return dict(sorted(final.items()))

    def usage(prompt_tokens: int, outs) -> dict:
        completion = sum(out.completion_tokens for out in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def sse(choices: ChoiceStreams, chunk, include_usage: bool, prompt_tokens: int,
                  headers: list[dict]) -> AsyncIterator[bytes | str]:
        try:
            for header in headers:
                yield sse_event(header)
            final: dict[int, RequestOutput] = {}
            async for index, out in choices:
                if out.error:
                    yield sse_event({'error': {'message': out.error, 'type': 'server_error', 'code': 500}})
                    break
                body = chunk(index, out)   # None: nothing to send yet (text held back)
                if body is not None:
                    yield sse_event(body)
                if out.finished:
                    final[index] = out
            else:
                if include_usage:
                    last = chunk(0, None) | {"choices": [], "usage": usage(prompt_tokens, final.values())}
                    yield sse_event(last)
            yield "data: [DONE]\n\n"
        finally:
            await choices.aclose()

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"description": "A worker is down (Retry-After)",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health() -> Response:
        if not engine.loop_alive:
            return JSONResponse({"status": "unhealthy", "reason": "the engine loop stopped"}, 503)
        if engine.core_silent_s >= CORE_SILENCE_S:   # wedged: the liveness probe restarts the replica
            return JSONResponse({"status": "unhealthy", "reason": f"the engine core has not answered for "
                                 f"{engine.core_silent_s:.0f} s"}, 503)
        status = engine.status
        if status is None:
            return JSONResponse({"status": "unhealthy", "reason": "the engine core is starting"}, 503,
                                headers={"Retry-After": "5"})
        for name, pid in status.workers:
            if not pid:
                return JSONResponse({"status": "unhealthy", "reason": f"{name} is down"}, 503,
                                    headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "workers": {name: {"pid": pid} for name, pid in status.workers}})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        await engine.fresh_status()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/ready", responses={503: {"description": "Not ready yet (or a worker is down)",
                                        "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def ready() -> Response:
        return JSONResponse({"ready": engine.ready}, 200 if engine.ready else 503)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                             "owned_by": "neo", "root": served_name,
                                             "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionChunk))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_fields(body)
        check_ready()
        prompt = body.prompt
        batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)) else [prompt]
        if not batch or any(not p for p in batch):
            raise APIError(400, "the prompt is empty", "prompt")
        prompts_ids = [await prompts.encode(p, engine.max_model_len, "prompt", body.add_special_tokens)
                       if isinstance(p, str) else list(p) for p in batch]
        planned = [(ids, plan_request(ids, lambda _room: body.sampling_params(16), "prompt"))  # OpenAI's default
                   for ids in prompts_ids]
        rid, now = f"cmpl-{base_request_id(request, body.request_id)}", int(time.time())
        per = body.sequences_per_prompt
        choices = await start(rid, choices_of(planned, per))
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        shape = _CompletionShaper(body, LogprobFormatter(engine.tokenizer, bool(body.return_tokens_as_token_ids)),
                                  batch, prompts_ids, per)

        def chunk(index: int, out: RequestOutput | None) -> dict | None:
            choices = [] if out is None else [shape.choice(index, out)]
            if choices == [None]:
                return None
            return {"id": rid, "object": "text_completion", "created": now, "model": served_name, "choices": choices}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(choices, chunk, include, prompt_tokens, []), media_type="text/event-stream")
        final = shape.ranked(await collect(choices, request))
        return FastJSONResponse(chunk(0, None) | {"choices": [chunk(i, out)["choices"][0] for i, out in final.items()],
                                                  "usage": usage(prompt_tokens, final.values())})

    @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_fields(body)
        check_ready()
        text = await prompts.render_chat_request(body, lambda b: b.tool_request().template_tools)
        try:   # content and tool calls from the text (``tool_parsers``)
            tool_out = ToolOutput.for_request(body.tool_request(), engine.config.model.tool_call_parser)
        except ParamError as exc:
            raise APIError(400, str(exc), exc.param) from None
        prompt_ids = await prompts.encode(text, engine.max_model_len, "messages", body.add_special_tokens)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        params = plan_request(prompt_ids, body.sampling_params, "messages")
        rid, now = f"chatcmpl-{base_request_id(request, body.request_id)}", int(time.time())
        per = body.sequences_per_prompt
        choices = await start(rid, choices_of([(prompt_ids, params)], per))
        fmt = LogprobFormatter(engine.tokenizer, bool(body.return_tokens_as_token_ids))
        pending = PendingLogprobs()
        top = body.wanted_logprobs

        def chat_logprobs(entries) -> dict | None:
            return fmt.chat(entries or [], top) if top is not None else None

        def chunk(index: int, out: RequestOutput | None) -> dict | None:
            choices = []
            if out is not None:
                pending.add(index, out)
                if not (out.text or out.finished):
                    return None   # its tokens' logprobs go with the text they make
                choices = [{"index": index, "delta": {"content": out.text} if out.text else {},
                            "logprobs": chat_logprobs(pending.take(index)), "finish_reason": out.finish_reason}]
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": served_name,
                    "choices": choices}

        chunk = tool_out.wrap_chunk(chunk)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            headers = [chunk(0, None) | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]}
                       for i in range(body.n)]
            return StreamingResponse(sse(choices, chunk, include, len(prompt_ids), headers),
                                     media_type="text/event-stream")
        final = await collect(choices, request)
        if per != body.n:
            final = best_of(final, body.n, per)
        extra = {}
        if body.prompt_logprobs is not None:
            extra["prompt_logprobs"] = fmt.prompt(final[0].prompt_logprobs or [], body.prompt_logprobs)
        messages, final = tool_out.shape(final)
        return FastJSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": served_name,
                                 "choices": [{"index": i, "message": messages[i],
                                              "logprobs": chat_logprobs(out.logprobs),
                                              "finish_reason": out.finish_reason} for i, out in final.items()],
                                 "usage": usage(len(prompt_ids), final.values())} | extra)

    return app


class _CompletionShaper:
    """The choices of one completions response: ``echo`` (the prompt's text, and with ``logprobs``
    its tokens' logprobs, before the first text of each choice), ``logprobs`` of the tokens whose
    text a chunk carries (``text_offset`` counting on from the text sent before), ``best_of``
    ranking, and vLLM's ``prompt_logprobs``. A prompt's logprobs are computed by its first choice
    only; the others take them from it."""

    def __init__(self, body: CompletionRequest, fmt: LogprobFormatter, prompts: list, prompts_ids: list[list[int]],
                 per: int) -> None:
        self.body, self.fmt, self.per = body, fmt, per
        self.prompts_ids = prompts_ids
        self.prompt_texts = [p if isinstance(p, str) else fmt.tokenizer.decode(list(p)) for p in prompts] \
            if body.echo else []
        self.pending = PendingLogprobs()
        self.sent: dict[int, int] = {}            # choice -> length of the text sent so far
        self.prompt_lp: dict[int, list] = {}      # prompt -> its logprobs (from its first choice)

    def ranked(self, final: dict[int, RequestOutput]) -> dict[int, RequestOutput]:
        return best_of(final, self.body.n, self.per) if self.per != self.body.n else final

    def choice(self, index: int, out: RequestOutput) -> dict | None:
        """The choice's next part (streaming) or whole (``out`` final from ``collect``); None: hold."""
        body, k = self.body, self.body.logprobs
        prompt = index // self.body.n
        self.pending.add(index, out)
        if out.prompt_logprobs is not None and index % self.body.n == 0:
            self.prompt_lp[prompt] = out.prompt_logprobs
        first = index not in self.sent
        if not (out.text or out.finished or (first and body.echo)):
            return None
        entries = self.pending.take(index) or []
        text, tokens, shaped = out.text, [e.token for e in entries], list(entries)
        if first and body.echo:
            text = self.prompt_texts[prompt] + text
            ids = self.prompts_ids[prompt]
            plp = out.prompt_logprobs or self.prompt_lp.get(prompt) or []
            tokens, shaped = ids + tokens, [None, *plp[:len(ids) - 1]] + shaped
        offset = self.sent.get(index, 0)
        self.sent[index] = offset + len(text)
        choice = {"index": index, "text": text,
                  "logprobs": self.fmt.completion(shaped, tokens, k, offset) if k is not None else None,
                  "finish_reason": out.finish_reason}
        if body.prompt_logprobs is not None and out.finished:
            choice["prompt_logprobs"] = self.fmt.prompt(out.prompt_logprobs or self.prompt_lp.get(prompt) or [],
                                                        body.prompt_logprobs)
        return choice
