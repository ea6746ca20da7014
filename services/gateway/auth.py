"""API keys: ``Authorization: Bearer <key>`` on the OpenAI routes, checked before anything else."""

from __future__ import annotations

import hmac

from neo_gateway.errors import error_json

_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_WRONG = "Incorrect API key provided."
# The client may send the rest of a request body it was refused: close rather than read it.
_HEADERS = {"WWW-Authenticate": "Bearer", "Connection": "close"}


def _bearer(scope) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ApiKeyAuth:
    """Refuses requests to ``/v1/*`` (and ``/metrics`` with ``protect_metrics``) that do not carry one
    of ``keys``: 401 with OpenAI's error body (``code: invalid_api_key``). ``/health`` and ``/ready``
    stay open for probes. A presented key is compared with every configured key in constant time
    (``hmac.compare_digest``), so the answer's timing tells nothing about how much of a key matched.
    """

    def __init__(self, app, keys: tuple[str, ...], protect_metrics: bool) -> None:
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app, self.protect_metrics = app, protect_metrics
        self._keys = [k.encode() for k in keys]

    def protects(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    def accepts(self, token: str) -> bool:
        presented, ok = token.encode(), False
        for key in self._keys:  # no early exit: every key is compared, whichever matches
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.protects(scope["path"]):
            token = _bearer(scope)
            if token is None or not self.accepts(token):
                await error_json(401, _MISSING if token is None else _WRONG, None, "invalid_api_key",
                                 headers=_HEADERS)(scope, receive, send)
                return
        await self.app(scope, receive, send)
