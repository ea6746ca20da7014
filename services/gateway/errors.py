"""OpenAI-shaped error responses, and the handlers that turn every failure into one."""

from __future__ import annotations

import enum
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class RejectReason(str, enum.Enum):
    """Why a request was refused instead of served: the ``reason`` label of
    ``neo:request_rejected_total``."""

    INVALID = "invalid"                            # 400 and other 4xx: the request itself is wrong
    UNAUTHORIZED = "unauthorized"                  # 401: no or a wrong API key
    NOT_FOUND = "not_found"                        # 404: unknown model or route
    TIMEOUT = "timeout"                            # 408: headers or body too slow
    TOO_LARGE = "too_large"                        # 413: body over --max-request-bytes
    OVERLOADED = "overloaded"                      # 429: running + waiting at capacity
    UNAVAILABLE = "unavailable"                    # 503: a worker is down or not ready
    TOO_MANY_CONNECTIONS = "too_many_connections"  # 503: over --max-connections


_REJECTED_STATUS = {401: RejectReason.UNAUTHORIZED, 404: RejectReason.NOT_FOUND, 408: RejectReason.TIMEOUT,
                    413: RejectReason.TOO_LARGE, 429: RejectReason.OVERLOADED, 503: RejectReason.UNAVAILABLE}
_CLIENT_CLOSED = 499  # the client left: counted as an aborted request, not a rejection


def reject_reason(status: int) -> RejectReason | None:
    """The rejection an answer with this status stands for (None: served, aborted or a server error)."""
    if status in _REJECTED_STATUS:
        return _REJECTED_STATUS[status]
    if 400 <= status < 500 and status != _CLIENT_CLOSED:
        return RejectReason.INVALID
    return None


class APIError(Exception):
    """An error for the client: HTTP status, message, the offending field, and optional headers."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def _utf8(text: str | None) -> str | None:
    """Text that encodes as UTF-8: JSON may carry lone surrogates ("\\ud800") that a message can echo."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message, param = _utf8(message), _utf8(param)
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                                "invalid_request_error"),
                      "param": param, "code": code}, "object": "error"}


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error answer, for the ASGI layers in front of the routes."""
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|set|tuple|literal|function-\w+)\[.*\])$")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Union members appear in the location as type names; they say nothing about the field.
    # (match whole tags: a prefix test dropped real fields such as "stream_options")
    parts = [p for p in parts if not _UNION_TAG.match(p)] or parts
    return ".".join(parts) or None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {first.get('msg')}", "body"
        else:
            param = _param_of(tuple(first.get("loc", ())))
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)
