"""`neo gateway`: the control plane: this process is the API server (HTTP, tokenization, chat
templates, detokenization, stop strings, SSE); the engine core (scheduler, block managers, worker
links) runs in a child process it starts and stops (docs/design.md, "The engine core")."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Sequence

import uvicorn

from neo_common import tracing
from neo_common import event_loop
from neo_common.config import NeoConfig
from neo_common.model_source import resolve
from neo_gateway.api import create_app
from neo_gateway.drain import Drain, DrainingServer, DrainMiddleware
from neo_gateway.async_engine import AsyncEngine
from neo_gateway.http_protocol import server_options
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def build(config: NeoConfig):
    """The FastAPI app with an engine that starts and stops with the app, and its drain (outermost:
    a draining gateway refuses new requests before any other layer reads them)."""
    source = resolve(config.model)
    tokenizer = TextTokenizer.load(source.tokenizer_kind, source.tokenizer_path)
    engine = AsyncEngine(config, tokenizer, source.served_name)
    app = create_app(engine, source.served_name)
    drain = Drain(config.http.shutdown_grace_s, engine.fail_requests)
    app.add_middleware(DrainMiddleware, drain=drain)
    # FastAPI's own telemetry makes the HTTP server spans once a tracer provider is installed; the
    # engine hangs each request's phases under them, the workers their iteration spans.
    tracing.setup_tracing("neo-gateway")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        log.info("gateway for %s listening on http://%s:%d; waiting for the GPU worker on %s",
                 source.served_name, config.http.host, config.http.port, config.worker_addr)
        try:
            yield
        finally:
            await engine.stop()
            tracing.shutdown_tracing()

    app.router.lifespan_context = lifespan
    return app, engine, drain


def _exit_at_once(signum, _frame) -> None:
    raise SystemExit(0)   # still loading: nothing to drain (whatever SIGINT's inherited disposition)


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.for_process("neo gateway", __doc__, argv, "gateway")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_at_once)
    app, engine, drain = build(config)
    # The drain decides when the server exits (drain.py); the graceful timeout is what uvicorn then
    # gives connections that are still open (the drained requests have sent their last bytes).
    server = DrainingServer(uvicorn.Config(app, host=config.http.host, port=config.http.port,
                                           log_level=config.http.log_level, access_log=False,
                                           timeout_graceful_shutdown=5, **server_options(config.http, app)), drain)

    def core_exited() -> None:   # every request failed already; the supervisor restarts the replica
        server.should_exit = True

    engine.on_core_exit.append(core_exited)
    event_loop.run(server.serve())
    return 1 if engine.core_failed else 0
