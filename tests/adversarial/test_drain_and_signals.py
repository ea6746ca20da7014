"""A replica's life as an operator's tools end it: a rollout's SIGTERM drains the in-flight requests,
a SIGKILL of `neo serve` takes every child and shared-memory segment with it (the same ports serve
again at once), Ctrl-C works whatever signal dispositions the launcher inherited, and a clean stop
logs no error. Real `neo serve` process trees, real sockets, the embedded small model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from support.replica import descendants, http_status, pid_alive, reap, serve_port_flags, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PROMPT = "Tell a long story about a lighthouse keeper."
_LOG_FAULTS = re.compile(r"ERROR|Traceback|terminate called")


class Stream:
    """One streaming completion read by a thread, frame by frame (raw SSE, so a stream cut short
    without ``[DONE]`` is told apart from one that ended)."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.status: int | None = None
        self.chunks = 0
        self.usage: dict | None = None
        self.error: dict | None = None
        self.done = False
        self.exception: str | None = None
        self.ended_at: float | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=180) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        self.done = True
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        self.error = obj["error"]
                    elif obj.get("usage"):
                        self.usage = obj["usage"]
                    else:
                        self.chunks += 1
                        self.started.set()
        except httpx.HTTPError as exc:
            self.exception = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "a stream hung"


def _children_with_segments(launcher: int) -> tuple[list[int], set[str]]:
    """Every descendant of the launcher, and the /dev/shm segments they map."""
    pids = descendants(launcher)
    segments = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                segments |= {line.split()[-1] for line in f if "/dev/shm/neo-kv-" in line}
        except OSError:
            pass
    return pids, segments


def _log_faults(path: str) -> list[str]:
    with open(path, errors="replace") as f:
        return [line.rstrip() for line in f if _LOG_FAULTS.search(line)]


def test_sigterm_drains_eight_in_flight_streams(replica_factory):
    """A rollout's SIGTERM: /ready and new requests get 503 at once, the 8 streams in flight run to
    their last token and [DONE], then every process exits (the launcher with 0), logging no error."""
    r = replica_factory("--num-gpu-blocks", "128", "--offload-mode", "auto", "--num-cpu-blocks", "256",
                        "--shutdown-grace-s", "90")
    children = descendants(r.proc.pid)
    streams = [Stream(r.url, 64) for _ in range(8)]
    for s in streams:
        assert s.started.wait(120) and s.status == 200, (s.status, s.exception)
    r.proc.send_signal(signal.SIGTERM)
    t_signal = time.monotonic()
    assert wait_until(lambda: http_status(r.url + "/ready") == 503, 2), "/ready must turn 503 at once"
    refused = httpx.post(r.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4},
                         timeout=10)
    assert refused.status_code == 503 and refused.headers.get("retry-after")
    assert refused.json()["error"]["type"] == "service_unavailable_error"
    assert all(s.ended_at is None for s in streams), "the streams ended before the drain was observed"
    for s in streams:
        s.join(120)
    for s in streams:
        assert s.exception is None and s.error is None, (s.exception, s.error)
        assert s.done and s.usage and s.usage["completion_tokens"] == 64, (s.done, s.usage, s.chunks)
        assert s.ended_at > t_signal
    assert r.proc.wait(timeout=60) == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in children), 15), "a child outlived the launcher"
    assert _log_faults(r.log_path) == []


def test_grace_shorter_than_the_requests_ends_them_with_an_error(replica_factory):
    """Requests still running when --shutdown-grace-s ends get an error (an SSE error event, a 500
    for a non-streaming one): never a stream cut off as if it were complete."""
    r = replica_factory("--num-gpu-blocks", "128", "--shutdown-grace-s", "1")
    streams = [Stream(r.url, 2000) for _ in range(2)]
    whole: dict = {}

    def non_streaming() -> None:
        try:
            resp = httpx.post(r.url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True})
            whole["status"], whole["body"] = resp.status_code, resp.json()
        except httpx.HTTPError as exc:
            whole["status"] = type(exc).__name__

    t = threading.Thread(target=non_streaming, daemon=True)
    t.start()
    for s in streams:
        assert s.started.wait(120) and s.status == 200
    r.proc.send_signal(signal.SIGTERM)
    t_signal = time.monotonic()
    before = [s.chunks for s in streams]
    for s in streams:
        s.join(60)
    t.join(60)
    for s, chunks in zip(streams, before):
        assert s.exception is None, s.exception
        assert s.chunks > chunks, "the requests must decode on during the grace"
        assert s.error is not None and "shutting down" in s.error["message"], (s.error, s.chunks)
        assert s.ended_at - t_signal < 10
    assert whole["status"] == 500 and "shutting down" in whole["body"]["error"]["message"], whole
    assert r.proc.wait(timeout=60) == 0


def test_kill_9_of_the_launcher_takes_children_and_segments(replica_factory):
    """SIGKILL of `neo serve`: no orphan within 5 s, no shared-memory segment left, and a new
    replica on the same port and addresses serves."""
    r = replica_factory("--num-gpu-blocks", "64", "--offload-mode", "auto", "--num-cpu-blocks", "256")
    assert httpx.post(r.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello", "max_tokens": 4}).status_code == 200
    children, segments = _children_with_segments(r.proc.pid)
    assert len(children) >= 3 and segments, (children, segments)
    os.kill(r.proc.pid, signal.SIGKILL)
    r.proc.wait()
    try:
        assert wait_until(lambda: not any(pid_alive(p) for p in children), 5), \
            [p for p in children if pid_alive(p)]
        assert wait_until(lambda: not any(os.path.exists(s) for s in segments), 5), segments
    finally:   # what the launcher's death left behind is this test's to remove
        reap(None, children)
        for path in segments:
            if wait_until(lambda: not any(pid_alive(p) for p in children), 5) and os.path.exists(path):
                os.unlink(path)
    again = replica_factory(*r.args)
    assert again.port == r.port
    resp = httpx.post(again.url + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": "Hello",
                                                                       "max_tokens": 4})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def test_sigint_stops_every_child_although_the_launcher_inherited_it_ignored(tmp_path):
    """Started from a script in the background (SIGINT ignored, as a shell does for `cmd &`): SIGINT
    still stops the replica cleanly: every child gone, exit code 0, no error in the log."""
    log_path = str(tmp_path / "serve.log")
    args = [*serve_port_flags()[:2], "--num-gpu-blocks", "64", "--offload-mode", "auto", "--num-cpu-blocks", "256"]
    url = f"http://127.0.0.1:{args[args.index('--port') + 1]}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "serve", *args], stdout=log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    children: list[int] = []
    try:
        assert wait_until(lambda: http_status(url + "/ready") == 200 or proc.poll() is not None, 240)
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert httpx.post(url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 8}).status_code == 200
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert wait_until(lambda: not any(pid_alive(p) for p in children), 15)
        assert _log_faults(log_path) == []
    finally:
        reap(proc, children)


def test_sigterm_to_every_process_at_once_as_kubernetes_does(replica_factory):
    """A pod's containers all get SIGTERM at the same moment: the workers serve on until the
    gateway has drained and says Shutdown, so the streams in flight still complete."""
    r = replica_factory("--num-gpu-blocks", "64", "--offload-mode", "auto", "--num-cpu-blocks", "256",
                        "--shutdown-grace-s", "60")
    children = descendants(r.proc.pid)
    streams = [Stream(r.url, 64) for _ in range(2)]
    for s in streams:
        assert s.started.wait(120) and s.status == 200
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    t_signal = time.monotonic()
    for s in streams:
        s.join(120)
    for s in streams:
        assert s.exception is None and s.error is None, (s.exception, s.error)
        assert s.done and s.usage and s.usage["completion_tokens"] == 64 and s.ended_at > t_signal
    assert wait_until(lambda: not any(pid_alive(p) for p in children), 30), "a child did not stop"
    assert r.proc.wait(timeout=30) == 0
    assert _log_faults(r.log_path) == []
