"""How a replica's pod stops: the gateway drains, the workers outlive it, the grace period covers both.

On deletion the kubelet runs every container's ``preStop`` hook at once and sends each container
SIGTERM when its own hook returns; the pod is removed from the Service's endpoints at the same time,
asynchronously. So:

- the gateway's hook sleeps ``PRE_STOP_DELAY_S`` while the endpoints controllers and kube-proxy (or the
  ingress) stop sending it new requests; then SIGTERM starts its drain (readiness 503, new requests
  503, in-flight ones finish for up to ``--shutdown-grace-s``);
- the gpu-worker's and cpu-attention's hooks wait until the gateway no longer accepts connections
  on its HTTP port (it has drained and exited), so the in-flight requests keep their workers;
- ``terminationGracePeriodSeconds`` covers the delay, the drain and the workers' own stop.

The hooks exec the image's ``python3`` (every NEO image has it; none needs a shell).
"""

from __future__ import annotations

from typing import Any

PRE_STOP_DELAY_S = 5  # endpoint removal propagates in ~1-2 s on a healthy cluster; 5 s leaves room
STOP_MARGIN_S = 15  # the workers' own stop after the gateway exits, and the kubelet's slack

_SLEEP = "import time, sys; time.sleep(float(sys.argv[1]))"
# Poll the gateway's port on the pod's loopback until it refuses (the gateway exited) or the deadline.
_WAIT_GATEWAY = (
    "import socket, sys, time\n"
    "port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])\n"
    "while time.monotonic() < deadline:\n"
    "    try:\n"
    "        socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
    "    except OSError:\n"
    "        break\n"
    "    time.sleep(0.5)\n"
)


def termination_grace_seconds(shutdown_grace_s: int) -> int:
    return PRE_STOP_DELAY_S + shutdown_grace_s + STOP_MARGIN_S


def gateway_pre_stop() -> dict[str, Any]:
    return {"exec": {"command": ["python3", "-c", _SLEEP, str(PRE_STOP_DELAY_S)]}}


def worker_pre_stop(gateway_port: int, shutdown_grace_s: int) -> dict[str, Any]:
    """Hold the worker's SIGTERM until the gateway has drained (bounded by the delay plus the grace)."""
    deadline = PRE_STOP_DELAY_S + shutdown_grace_s + 2
    return {"exec": {"command": ["python3", "-c", _WAIT_GATEWAY, str(gateway_port), str(deadline)]}}
