"""``neo cpu-attention``: the CPU decode-attention process of one replica (no torch)."""

from __future__ import annotations

import logging
from typing import Sequence

from neo_common.config import NeoConfig


def main(argv: Sequence[str] | None = None) -> int:
    config = NeoConfig.from_args(argv)
    logging.basicConfig(level=config.http.log_level.upper(),
                        format="%(asctime)s %(levelname)s cpu_attention %(name)s: %(message)s")
    from neo_common import tracing
    from neo_cpu_attention.server import CpuAttentionServer, install_signal_handlers

    tracing.setup_tracing("neo-cpu-attention")
    server = CpuAttentionServer(config)
    install_signal_handlers(server)
    try:
        return server.run()
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":
    raise SystemExit(main())
