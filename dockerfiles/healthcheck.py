#!/usr/bin/env python3
"""Container health check for the NEO images (standard library only).

usage: neo-healthcheck http     GET $NEO_HEALTHCHECK_URL (default http://127.0.0.1:$NEO_PORT/health)
       neo-healthcheck process  the container's main process (PID 1) is alive and not a zombie

Exit 0 when healthy, 1 when not (the Docker/OCI HEALTHCHECK contract). Setting NEO_HEALTHCHECK_URL
turns any image's check into an HTTP check (e.g. the operator's kopf liveness endpoint).
Kubernetes ignores image health checks: the pods the operator builds carry their own probes.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def http_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URL)
            return 200 <= response.status < 300
    except (OSError, urllib.error.URLError) as exc:
        sys.stderr.write(f"neo-healthcheck: {url}: {exc}\n")
        return False


def process_ok(pid: int = 1) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError as exc:
        sys.stderr.write(f"neo-healthcheck: pid {pid}: {exc}\n")
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X", "x")


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "process"
    timeout = float(os.environ.get("NEO_HEALTHCHECK_TIMEOUT", "3"))
    url = os.environ.get("NEO_HEALTHCHECK_URL", "")
    if mode == "http" or url:
        url = url or f"http://127.0.0.1:{os.environ.get('NEO_PORT', '8000')}/health"
        return 0 if http_ok(url, timeout) else 1
    if mode == "process":
        return 0 if process_ok() else 1
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
