"""The workload pod is hardened: read-only root filesystems with writable emptyDirs where the processes
write, no ServiceAccount token, a private link volume, the API key from a Secret, and a stop sequence
(preStop hooks, grace period) that lets the gateway drain."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import kopf
import kubernetes_validate
import pytest

from neo_common.procs import free_port
from neo_operator import constants as c
from neo_operator.configmap import build_configmap
from neo_operator.deployment import CACHE_ENV, RUN_AS_USER, build_deployment
from neo_operator.lifecycle import PRE_STOP_DELAY_S, gateway_pre_stop, termination_grace_seconds, worker_pre_stop
from neo_operator.sizing import size

from op_helpers import make_node, make_spec

OWNER = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "svc", "namespace": "t", "uid": "u-1"}}
SECRET_SPEC = {"name": "neo-keys", "key": "api-keys"}


def _pod(**spec_overrides):
    spec = make_spec(**spec_overrides)
    d = size(spec, [make_node()])
    return spec, d, build_deployment("svc", spec, d, "h")


def test_every_container_has_a_read_only_root_and_writable_scratch() -> None:
    _, _, dep = _pod(model={"source": "hf", "geometry": "llama-3-8b", "volume": {"claimName": "m", "path": "l"}})
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == RUN_AS_USER
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["runtime"]["emptyDir"]["medium"] == "Memory"
    assert {"tmp", "cache", "shm", "runtime"} <= {n for n, v in volumes.items() if "emptyDir" in v}
    for ct in pod["containers"] + pod["initContainers"]:
        sc = ct["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, ct["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "runAsUser" not in sc  # one uid for the pod: the runtime dir is 0700 and shared
    for ct in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in ct["volumeMounts"]}
        assert mounts["/tmp"] == "tmp" and mounts[c.CACHE_MOUNT] == "cache" and mounts[c.RUNTIME_MOUNT] == "runtime"
        env = {e["name"]: e.get("value") for e in ct["env"]}
        # every cache and $HOME lands inside a writable emptyDir of this container
        for var in ("HOME", "XDG_CACHE_HOME", "NEO_COST_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                    "HF_HOME"):
            assert env[var] == CACHE_ENV[var]
            owner = next(path for path in mounts if env[var] == path or env[var].startswith(path + "/"))
            assert "emptyDir" in volumes[mounts[owner]], (var, owner)
    # the runtime dir the processes create (0700) is inside the shared private volume
    assert c.RUNTIME_DIR.startswith(c.RUNTIME_MOUNT + "/")


def test_api_key_comes_from_the_secret_into_the_gateway_only() -> None:
    spec, d, dep = _pod(apiKeySecretRef=SECRET_SPEC)
    assert spec.api_key_secret is not None and spec.api_key_secret.key == "api-keys"
    containers = {ct["name"]: ct for ct in dep["spec"]["template"]["spec"]["containers"]}
    (key_env,) = [e for e in containers["gateway"]["env"] if e["name"] == "NEO_API_KEY"]
    assert key_env == {"name": "NEO_API_KEY", "valueFrom": {"secretKeyRef": SECRET_SPEC}}
    for name in ("gpu-worker", "cpu-attention"):
        assert all(e["name"] != "NEO_API_KEY" for e in containers[name]["env"])
    assert "NEO_API_KEY" not in build_configmap("svc", spec, d)["data"]
    kopf.adopt([dep], owner=OWNER)
    kubernetes_validate.validate(dep, "1.25.0", strict=True)
    _, _, plain = _pod()
    gateway = plain["spec"]["template"]["spec"]["containers"][0]
    assert all(e["name"] != "NEO_API_KEY" for e in gateway["env"])


def test_grace_period_covers_the_drain() -> None:
    spec, d, dep = _pod(shutdownGraceSeconds=90)
    pod = dep["spec"]["template"]["spec"]
    assert build_configmap("svc", spec, d)["data"]["NEO_SHUTDOWN_GRACE_S"] == "90.0"
    assert pod["terminationGracePeriodSeconds"] == termination_grace_seconds(90) > 90 + PRE_STOP_DELAY_S
    containers = {ct["name"]: ct for ct in pod["containers"]}
    assert containers["gateway"]["lifecycle"]["preStop"] == gateway_pre_stop()
    for name in ("gpu-worker", "cpu-attention"):
        assert containers[name]["lifecycle"]["preStop"] == worker_pre_stop(c.GATEWAY_PORT, 90)
    _, _, default = _pod()
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == termination_grace_seconds(30)


def _hook(command: list[str]) -> list[str]:
    assert command[0] == "python3"  # the image's interpreter; here, this test's
    return [sys.executable, *command[1:]]


def test_gateway_pre_stop_sleeps_the_delay() -> None:
    cmd = _hook(gateway_pre_stop()["exec"]["command"])
    assert cmd[-1] == str(PRE_STOP_DELAY_S)
    start = time.monotonic()
    subprocess.run([*cmd[:-1], "0.3"], check=True, timeout=10)
    assert 0.3 <= time.monotonic() - start < 5


def test_worker_pre_stop_waits_for_the_gateway_to_close_its_port() -> None:
    """The workers' hook, run for real against a listener standing in for the gateway's HTTP port."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    listener.listen(64)
    cmd = _hook(worker_pre_stop(c.GATEWAY_PORT, 30)["exec"]["command"])
    assert cmd[-2:] == [str(c.GATEWAY_PORT), str(PRE_STOP_DELAY_S + 30 + 2)]
    hook = subprocess.Popen([*cmd[:-2], str(port), "20"])
    try:
        time.sleep(1.5)
        assert hook.poll() is None, "the hook returned while the gateway was still listening"
        listener.close()
        closed = time.monotonic()
        assert hook.wait(timeout=5) == 0
        assert time.monotonic() - closed < 3
    finally:
        if hook.poll() is None:
            hook.kill()
            hook.wait()
        listener.close()
    # bounded: a gateway that never goes away does not hold the pod past the deadline
    listener = socket.create_server(("127.0.0.1", port))
    try:
        start = time.monotonic()
        subprocess.run([*cmd[:-2], str(port), "1"], check=True, timeout=10)
        assert time.monotonic() - start < 4
    finally:
        listener.close()


@pytest.mark.parametrize("raw,field", [
    ({"apiKeySecretRef": {"name": "Bad_Name", "key": "k"}}, "apiKeySecretRef.name"),
    ({"apiKeySecretRef": {"name": "ok", "key": "a/b"}}, "apiKeySecretRef.key"),
    ({"apiKeySecretRef": "neo-keys"}, "apiKeySecretRef"),
    ({"shutdownGraceSeconds": -1}, "shutdownGraceSeconds"),
    ({"shutdownGraceSeconds": 4000}, "shutdownGraceSeconds"),
])
def test_bad_auth_and_grace_fields_name_the_field(raw: dict, field: str) -> None:
    from neo_operator.spec import SpecError

    with pytest.raises(SpecError) as info:
        make_spec(**raw)
    assert info.value.field == field
