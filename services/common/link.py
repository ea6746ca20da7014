"""The security of the process link: a private runtime directory, and CurveZMQ keys for ``tcp://``.

The gateway binds one socket per worker role and the workers connect (docs/design.md, "The process
link"). Who may connect is decided here:

- ``ipc://`` (the default): the sockets live in the replica's runtime directory, created mode 0700
  and owned by this user, so no other user of the host can reach them (in Kubernetes the directory
  is an ``emptyDir`` that only the pod's own containers mount).
- ``tcp://``: anyone who can reach the port could connect, so the link is always CurveZMQ: a server
  and a client keypair generated per replica and kept in ``link.keys`` (mode 0600) in the runtime
  directory; the gateway's ZAP handler admits only the client key, and the workers check the
  server's key, so neither side can be impersonated by a process that cannot read that file.

Which *registered* peer of a role a link talks to, and what happens to any other, is the link's own
business (``neo_gateway.worker_link``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from typing import Callable

import zmq

KEYS_FILE = "link.keys"


class LinkSecurityError(RuntimeError):
    """The runtime directory or the key file is not private to this user: refuse to use it."""


def default_runtime_dir(http_port: int) -> str:
    """``<tmp>/neo-<uid>-<http port>``: one per replica of this user on the host."""
    return os.path.join(tempfile.gettempdir(), f"neo-{os.geteuid()}-{http_port}")


def prepare_runtime_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if missing and check it is a real directory of this user that no
    one else may enter; returns it. Raises LinkSecurityError naming what is wrong."""
    try:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise LinkSecurityError(f"runtime directory {path} is not a directory (a link or a file?): remove it "
                                "or pick another --runtime-dir")
    if st.st_uid != os.geteuid():
        raise LinkSecurityError(f"runtime directory {path} belongs to uid {st.st_uid}, not to this user "
                                f"({os.geteuid()}): remove it or pick another --runtime-dir")
    if st.st_mode & 0o077:
        raise LinkSecurityError(f"runtime directory {path} has mode {st.st_mode & 0o777:o}; it must be 700 "
                                f"(chmod 700 {path}, or pick another --runtime-dir)")
    return path


def remove_runtime_dir(path: str) -> None:
    """Remove the replica's sockets and keys (left-over sockets are harmless but untidy)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for name in os.listdir(path):
        if name.endswith((".sock", "-rendezvous")) or name == KEYS_FILE or name.startswith(KEYS_FILE + "."):
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass   # something else lives there (a user-given directory): leave it


def is_tcp(addr: str) -> bool:
    return addr.startswith("tcp://")


class LinkKeys:
    """The replica's two CurveZMQ keypairs (z85 bytes): the gateway serves with ``server_*`` and
    admits only ``client_public``; every worker connects with ``client_*`` and trusts only
    ``server_public``. Generated once per replica; never travel over the link."""

    def __init__(self, server_public: bytes, server_secret: bytes, client_public: bytes, client_secret: bytes) -> None:
        self.server_public, self.server_secret = server_public, server_secret
        self.client_public, self.client_secret = client_public, client_secret

    @classmethod
    def generate(cls) -> "LinkKeys":
        return cls(*zmq.curve_keypair(), *zmq.curve_keypair())

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k).decode() for k in
                           ("server_public", "server_secret", "client_public", "client_secret")})

    @classmethod
    def from_json(cls, text: str) -> "LinkKeys":
        d = json.loads(text)
        return cls(*(d[k].encode() for k in ("server_public", "server_secret", "client_public", "client_secret")))

    @classmethod
    def load_or_create(cls, runtime_dir: str) -> "LinkKeys":
        """The keys of this replica, created (atomically, mode 0600) by the first process asking."""
        path = os.path.join(prepare_runtime_dir(runtime_dir), KEYS_FILE)
        tmp = f"{path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cls.generate().to_json())
        try:
            os.link(tmp, path)   # fails if another process created the file first: use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return cls.load(runtime_dir)

    @classmethod
    def load(cls, runtime_dir: str, timeout_s: float = 0.0) -> "LinkKeys":
        """Read the keys, waiting up to ``timeout_s`` for the gateway or launcher to create them."""
        path = os.path.join(runtime_dir, KEYS_FILE)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise LinkSecurityError(f"link key file {path} must be a regular file of this user with mode 600")
        with open(path) as f:
            return cls.from_json(f.read())


def secure_bind(sock: zmq.Socket, addr: str, keys: LinkKeys | None, zap_domain: str) -> None:
    """Bind the gateway's end: as a CurveZMQ server on tcp, its ZAP requests tagged ``zap_domain``
    (one per link, so a denied key is counted against the link it tried)."""
    if is_tcp(addr):
        if keys is None:
            raise LinkSecurityError(f"{addr}: a tcp link needs the replica's CurveZMQ keys")
        sock.curve_server = True
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.zap_domain = zap_domain.encode()
    sock.bind(addr)


def secure_connect(sock: zmq.Socket, addr: str, runtime_dir: str, wait_s: float = 30.0) -> None:
    """Connect a worker's end: as a CurveZMQ client on tcp (keys from the runtime directory)."""
    if is_tcp(addr):
        keys = LinkKeys.load(runtime_dir, wait_s)
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.client_public
        sock.curve_secretkey = keys.client_secret
    sock.connect(addr)


class ClientKeyCheck:
    """ZAP credentials provider: admits the replica's client key only; ``on_denied(domain)`` is
    called for every other key (the link bound with that ZAP domain counts it)."""

    def __init__(self, keys: LinkKeys, on_denied: Callable[[str], None]) -> None:
        self.keys, self.on_denied = keys, on_denied

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key == self.keys.client_public
        if not ok:
            self.on_denied(domain)
        return ok
