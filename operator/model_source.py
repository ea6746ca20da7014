"""Models from the Hugging Face Hub (``spec.model.source: hf://org/name[@revision]``): the pod parts.

Two pods run ``neo fetch-model`` (``neo_operator.model_fetch``) with the same environment, built here:

- the model-inspection Job (``model_inspection``), before anything is sized: config.json alone, so the
  operator learns the commit the revision names and the model's geometry, and a wrong token or a
  missing revision becomes a condition with nothing written;
- the engine pod's ``model-download`` init container: the whole snapshot of that commit into the
  ``model`` volume (an emptyDir: every pod downloads its own copy, pinned to the same commit), which
  the gateway and gpu-worker mount read-only at ``/models`` and serve from ``/models/<org>/<name>``.

The token reaches the container as ``HF_TOKEN`` from the Secret ``spec.model.hub.tokenSecretRef``
names (the operator never reads it), the endpoint as ``HF_ENDPOINT``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from neo_operator import constants as c
from neo_operator.model_fetch import HubRef

INIT_CONTAINER = "model-download"
FETCH_TMP = "/tmp"
# The init container's own requests are its limits, so the pod can be Guaranteed (every container,
# init containers included, must have requests equal to limits).
FETCH_RESOURCES = {"cpu": "1", "memory": "1Gi"}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """``spec.model.source`` of hf:// and ``spec.model.hub``: where the model is, how to reach it."""

    ref: HubRef
    token_secret: str = ""  # a Secret of the NeoService's namespace ("" : public model, no token)
    token_key: str = "token"
    endpoint: str = ""  # "" : huggingface_hub's default (the public Hub)
    cache_size: str = ""  # sizeLimit of the model volume ("" : none)
    resolved: str = ""  # the commit the model-inspection Job found the revision to name ("" : not yet)

    @property
    def model_dir(self) -> str:
        """Where the engine reads the model (inside the ``model`` volume)."""
        return f"{c.MODEL_MOUNT}/{self.ref.repo_id}"

    def key(self) -> dict[str, str]:
        """What decides the inspection's answer: a change of any of it inspects again."""
        return {"source": self.ref.uri, "endpoint": self.endpoint, "tokenSecret": f"{self.token_secret}/{self.token_key}"}


def fetch_env(hub: HubSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HOME", "value": FETCH_TMP}, {"name": "HF_HOME", "value": f"{FETCH_TMP}/hf"},
                                 {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if hub.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hub.endpoint})
    if hub.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hub.token_secret, "key": hub.token_key}}})
    return env


def fetch_command(hub: HubSpec, revision: str, target: str, config_only: bool) -> list[str]:
    """``neo fetch-model`` of ``revision`` (the resolved commit once known) into ``target``."""
    ref = dataclasses.replace(hub.ref, revision=revision or hub.ref.revision)
    return ["neo", "fetch-model", ref.uri, "--dir", target, "--message-file", "/dev/termination-log",
            *(["--config-only"] if config_only else [])]


def fetch_container(hub: HubSpec, image: str, pull_policy: str, revision: str, target: str, config_only: bool,
                    mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": INIT_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": fetch_command(hub, revision, target, config_only),
        "env": fetch_env(hub),
        "volumeMounts": mounts,
        "resources": {"requests": dict(FETCH_RESOURCES), "limits": dict(FETCH_RESOURCES)},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        # the result line is written to the file; on a crash the log tail says why
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def download_init_container(hub: HubSpec, image: str, pull_policy: str) -> dict[str, Any]:
    """The engine pod's init container: the whole snapshot of the resolved commit into the model volume."""
    return fetch_container(hub, image, pull_policy, hub.resolved, hub.model_dir, config_only=False,
                           mounts=[{"name": "model", "mountPath": c.MODEL_MOUNT},
                                   {"name": "tmp", "mountPath": FETCH_TMP}])


def model_volume(hub: HubSpec) -> dict[str, Any]:
    return {"name": "model", "emptyDir": {"sizeLimit": hub.cache_size} if hub.cache_size else {}}
