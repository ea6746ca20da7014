"""A real control plane for the operator tests: etcd + kube-apiserver + kube-controller-manager.

The binaries come from the cache `scripts/k8s-tools.sh` fills (``make test`` runs it first); a missing
binary fails the tests instead of skipping them. Ports are picked free, state lives in temp dirs, and
teardown stops the API server before etcd, each by PID.

There is no kubelet and no scheduler: Deployments get no pods (their status is written by the tests),
while the job controller does create the probe Jobs' pods, which a test marks finished in the
kubelet's place (``fake_kubelet_complete_probe``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from neo_common.procs import free_port, free_ports

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = os.environ.get("NEO_K8S_VERSION", "1.20.2")
CACHE = Path(os.environ.get("NEO_K8S_CACHE", Path.home() / ".cache" / "neo-k8s")) / K8S_VERSION
CRD_FILE = REPO / "charts" / "neo" / "crds" / "neoservices.neo.serving.io.yaml"
CHART = REPO / "charts" / "neo"
ADMIN_TOKEN = "neo-test-admin-token"
OPERATOR_TOKEN = "neo-test-operator-token"
OPERATOR_NAMESPACE = "neo-system"
OPERATOR_SA = "neo-operator"
PULL_SECRET = "neo-registry"  # the operator's imagePullSecrets (the chart's), which its probe Jobs carry  # the chart's ServiceAccount name for release "neo"
# a second release, watching chosen namespaces only (the chart's namespaced RBAC)
SCOPED_TOKEN = "neo-test-scoped-token"
SCOPED_NAMESPACE = "neo-scoped"
SCOPED_SA = "neo-scoped-operator"


def tool(name: str) -> Path:
    path = CACHE / name
    if not path.exists():
        pytest.fail(f"{path} missing: run `make k8s-tools` (scripts/k8s-tools.sh) first")
    return path


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value/exception."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - transient API errors while things settle
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path


@dataclasses.dataclass
class Cluster:
    """A running control plane; ``api`` is an admin ApiClient, ``operator_kubeconfig`` authenticates as
    the chart's ServiceAccount (static token), so the operator runs with exactly the chart's RBAC."""

    server: str
    admin_kubeconfig: Path
    operator_kubeconfig: Path
    scoped_kubeconfig: Path
    workdir: Path
    logs: dict[str, Path]
    api: Any = None

    def log_tail(self, name: str, lines: int = 60) -> str:
        text = self.logs[name].read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _readyz(server: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(server + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
        return resp.status == 200


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    etcd, apiserver, kcm = tool("etcd"), tool("kube-apiserver"), tool("kube-controller-manager")
    # etcd fsyncs every write: keep its data on tmpfs when there is one
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="neo-k8s-", dir=base))
    logs = {name: work / f"{name}.log" for name in ("etcd", "apiserver", "controller-manager")}
    procs: list[subprocess.Popen] = []
    try:
        client_port, peer_port, api_port = free_ports(1, 1, 1)
        procs.append(_start([
            str(etcd), "--name", "neo-test", "--data-dir", str(work / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"neo-test=http://127.0.0.1:{peer_port}",
        ], logs["etcd"]))
        subprocess.run(["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], check=True,
                       capture_output=True)
        # static tokens that authenticate exactly as the chart's ServiceAccounts would
        lines = [f"{ADMIN_TOKEN},admin,1,system:masters"]
        for uid, (token, ns, sa) in enumerate([(OPERATOR_TOKEN, OPERATOR_NAMESPACE, OPERATOR_SA),
                                               (SCOPED_TOKEN, SCOPED_NAMESPACE, SCOPED_SA)], start=2):
            lines.append(f'{token},system:serviceaccount:{ns}:{sa},{uid},'
                         f'"system:serviceaccounts,system:serviceaccounts:{ns}"')
        (work / "tokens.csv").write_text("\n".join(lines) + "\n")
        procs.append(_start([
            str(apiserver), f"--etcd-servers=http://127.0.0.1:{client_port}", "--bind-address=127.0.0.1",
            f"--secure-port={api_port}", "--insecure-port=0", f"--cert-dir={work / 'certs'}",
            f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={work / 'sa.key'}", f"--service-account-signing-key-file={work / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc", "--service-cluster-ip-range=10.96.0.0/24",
            "--disable-admission-plugins=ServiceAccount", "--enable-priority-and-fairness=false",
        ], logs["apiserver"]))
        server = f"https://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if _readyz(server):
                    break
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                pytest.fail("kube-apiserver did not become ready:\n" + logs["apiserver"].read_text()[-3000:])
            time.sleep(0.3)
        admin = kubeconfig(work / "admin.kubeconfig", server, ADMIN_TOKEN)
        operator = kubeconfig(work / "operator.kubeconfig", server, OPERATOR_TOKEN)
        scoped = kubeconfig(work / "scoped.kubeconfig", server, SCOPED_TOKEN)
        procs.append(_start([
            str(kcm), f"--kubeconfig={admin}", "--leader-elect=false",
            # GC removes a deleted NeoService's children; the job controller gives probe Jobs their pods.
            "--controllers=garbagecollector,namespace,job", "--secure-port=0", "--port=0",
        ], logs["controller-manager"]))
        from kubernetes import config
        api = config.new_client_from_config(str(admin))
        yield Cluster(server=server, admin_kubeconfig=admin, operator_kubeconfig=operator,
                      scoped_kubeconfig=scoped, workdir=work,
                      logs=logs, api=api)
    finally:
        # controller-manager, then the API server, then etcd
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def helm_template(*args: str, release: str = "neo") -> list[dict[str, Any]]:
    out = subprocess.run([str(tool("helm")), "template", release, str(CHART), *args], check=True,
                         capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


class Operator:
    """A real `neo operator` process authenticated as the chart's ServiceAccount; restartable (as in
    an upgrade), stopped by PID."""

    def __init__(self, cluster: Cluster, kubeconfig: Path, probe_namespace: str, args: tuple[str, ...] = (),
                 name: str = "operator") -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.probe_namespace = probe_namespace
        self.args = args
        self.log = cluster.workdir / f"{name}.log"
        self.health_port = free_port()
        self.proc: subprocess.Popen | None = None

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "neo_common.cli", "operator", *self.args,
                 "--probe-namespace", self.probe_namespace, "--retry-seconds", "1",
                 "--gateway-image", "neo/gateway:test", "--gpu-worker-image", "neo/gpu-worker:test",
                 "--cpu-attention-image", "neo/cpu-attention:test",
                 "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = self.proc

        def alive() -> bool:
            assert proc.poll() is None, "operator exited:\n" + self.tail()
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
                return resp.status == 200

        wait_for(alive, timeout=60, what="operator liveness endpoint")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            assert self.proc.returncode == 0, "operator did not exit cleanly on SIGTERM:\n" + self.tail()

    def restart(self) -> None:
        self.stop()
        self.start()


def install_crd(cluster: Cluster) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(cluster.api)
    crd = yaml.safe_load(CRD_FILE.read_text())
    with contextlib.suppress(client.ApiException):
        ext.create_custom_resource_definition(crd)

    def established() -> bool:
        got = ext.read_custom_resource_definition(crd["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

    wait_for(established, what="CRD Established")


def create_namespace(cluster: Cluster, name: str) -> None:
    from kubernetes import client

    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(cluster.api).create_namespace({"metadata": {"name": name}})


def install_rbac(cluster: Cluster, release: str, namespace: str, *sets: str) -> set[str]:
    """Apply the chart's ServiceAccount and RBAC objects (rendered by helm); returns the SA names."""
    from kubernetes import utils

    create_namespace(cluster, namespace)
    args = ["--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    rendered = helm_template(*args, release=release)
    for doc in rendered:
        if doc["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}:
            ns = doc["metadata"].setdefault("namespace", namespace)
            with contextlib.suppress(utils.FailToCreateError):
                utils.create_from_dict(cluster.api, doc, namespace=ns)
    return {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Operator]:
    """The CRD from the chart, the chart's RBAC in its cluster-wide mode (``operator.clusterWide``), and
    a real `neo operator` process running as its ServiceAccount, watching all namespaces. The
    namespaced default has its own release in test_k8s_namespaced.py."""
    install_crd(cluster)
    sa_names = install_rbac(cluster, "neo", OPERATOR_NAMESPACE, "operator.clusterWide=true")
    assert OPERATOR_SA in sa_names, f"chart ServiceAccount is {sa_names}, the static token expects {OPERATOR_SA}"
    op = Operator(cluster, cluster.operator_kubeconfig, OPERATOR_NAMESPACE, ("--image-pull-secrets", PULL_SECRET))
    try:
        op.start()
        yield op
    finally:
        op.stop()
        if os.environ.get("NEO_K8S_SHOW_LOGS"):
            sys.stderr.write(op.tail(400) + "\n")
