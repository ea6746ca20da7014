"""`neo gateway`: the control-plane process (HTTP API, tokenizer, scheduler, worker links)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Sequence

import uvicorn
import zmq.asyncio

from neo_common import tracing
from neo_common.config import NeoConfig
from neo_common.model_source import resolve
from neo_gateway.api import create_app
from neo_gateway.engine import Engine
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def build(config: NeoConfig):
    """The FastAPI app with an engine that starts and stops with the app."""
    source = resolve(config.model)
    tokenizer = TextTokenizer.load(source.tokenizer_kind, source.tokenizer_path)
    ctx = zmq.asyncio.Context()
    engine = Engine(config, tokenizer, ctx, source.served_name)
    app = create_app(engine, source.served_name)
    # FastAPI's own telemetry makes the HTTP server spans once a tracer provider is installed; the
    # engine hangs each request's phases and the workers' iteration spans under them.
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
            ctx.term()
            tracing.shutdown_tracing()

    app.router.lifespan_context = lifespan
    return app, engine


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.for_process("neo gateway", __doc__, argv, "gateway")
    app, _ = build(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.http.host, port=config.http.port,
                                           log_level=config.http.log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    asyncio.run(server.serve())
    return 0
