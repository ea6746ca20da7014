"""A local stand-in for the Hugging Face Hub (the real one cannot be reached from the tests).

A small real HTTP server on a loopback port that answers the few endpoints
``huggingface_hub.snapshot_download`` (and ``HfApi.model_info``) call, as the Hub answers them:

- ``GET /api/models/{repo}/revision/{revision}``: the repo's info with ``sha``, the commit the
  revision names (``HfApi.model_info``, ``snapshot_download``'s ``repo_info`` call);
- ``GET /api/models/{repo}/tree/{commit}?recursive=...``: the files of the commit (one page, no
  ``Link`` header: ``list_repo_tree``);
- ``HEAD`` / ``GET /{repo}/resolve/{commit}/{path}``: a file's metadata (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``) and its bytes (``hf_hub_download``).

Errors look like the Hub's: 401 without a valid ``Authorization: Bearer`` token (every repo here is
private), 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.
Point a client at it with ``HF_ENDPOINT=<url>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import json
import threading
import urllib.parse
from typing import Iterator


@dataclasses.dataclass
class StandinRepo:
    """One model repo: ``files`` (path -> bytes) at one commit, and the names (branches, tags) that
    point at it."""

    repo_id: str
    files: dict[str, bytes]
    refs: tuple[str, ...] = ("main",)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        return digest.hexdigest()

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in self.refs or revision == self.commit else None


class HubStandin:
    """The server; ``url`` is its endpoint, ``token`` the one token it accepts, ``requests`` the
    (method, path) pairs it served (so a test can see what a client asked for)."""

    def __init__(self, repos: list[StandinRepo], token: str) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.requests: list[tuple[str, str]] = []
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                standin._serve(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                standin._serve(self, body=False)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubStandin":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- request handling ------------------------------------------------------------------------
    def _serve(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        url = urllib.parse.urlsplit(h.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        self.requests.append((h.command, url.path))
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, None, "Invalid credentials in Authorization header", body)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, what, revision = self._repo(parts[2:4]), parts[4], parts[5]
            if repo is None:
                return self._error(h, 404, "RepoNotFound", "Repository not found", body)
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            if what == "revision":
                info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": True,
                        "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
                return self._json(h, info, body)
            tree = [{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for p, data in sorted(repo.files.items())]
            return self._json(h, tree, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(parts[:2])
            if repo is None:
                return self._error(h, 404, "RepoNotFound", "Repository not found", body)
            commit = repo.resolve(parts[3])
            if commit is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {parts[3]}", body)
            path = "/".join(parts[4:])
            if path not in repo.files:
                return self._error(h, 404, "EntryNotFound", f"{path} does not exist", body)
            data = repo.files[path]
            return self._send(h, 200, data, {"Content-Type": "application/octet-stream",
                                             "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                             "X-Repo-Commit": commit}, body)
        return self._error(h, 404, None, "Not Found", body)

    def _repo(self, org_name: list[str]) -> StandinRepo | None:
        return self.repos.get("/".join(org_name))

    def _json(self, h: http.server.BaseHTTPRequestHandler, obj: object, body: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, h: http.server.BaseHTTPRequestHandler, status: int, code: str | None, message: str,
               body: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, body)

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str],
              body: bool) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


@contextlib.contextmanager
def hub_standin(repos: list[StandinRepo], token: str) -> Iterator[HubStandin]:
    """A running stand-in, stopped on exit."""
    hub = HubStandin(repos, token).start()
    try:
        yield hub
    finally:
        hub.stop()


def run_container_locally(container: dict, secrets: dict[tuple[str, str], str], paths: dict[str, str],
                          timeout: float = 120.0) -> tuple[int, str]:
    """Run a pod container's command as a local process, as a kubelet would run it: its ``env`` with
    ``secretKeyRef`` values taken from ``secrets`` ((name, key) -> value), the termination-message file
    and the mount paths mapped onto local folders (``paths``: container path -> local path, applied to
    the command and the env). Returns (exit status, the termination message)."""
    import os
    import subprocess
    import sys
    import tempfile

    def mapped(text: str) -> str:
        for inside, outside in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if text == inside or text.startswith(inside + "/"):
                return outside + text[len(inside):]
        return text

    with tempfile.TemporaryDirectory() as tmp:
        message = os.path.join(tmp, "termination-log")
        env = {"PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = mapped(var["value"])
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = secrets[(ref["name"], ref["key"])]
        cmd = [message if part == container.get("terminationMessagePath", "/dev/termination-log") else mapped(part)
               for part in container["command"]]
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        text = open(message).read() if os.path.exists(message) else ""
        if proc.returncode and not text:  # FallbackToLogsOnError
            text = (proc.stdout + proc.stderr)[-2048:]
        return proc.returncode, text
