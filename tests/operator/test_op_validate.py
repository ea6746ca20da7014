"""Every child the operator builds is a valid Kubernetes object (strict: no unknown fields)."""

from __future__ import annotations

import kopf
import kubernetes_validate
import pytest

from neo_operator import constants as c
from neo_operator.configmap import build_configmap, config_hash
from neo_operator.deployment import build_deployment
from neo_operator.probejob import build_probe_job
from neo_operator.service import build_service
from neo_operator.sizing import size

from op_helpers import make_node, make_spec, node_dict

OWNER = {"apiVersion": c.API_VERSION, "kind": c.KIND,
         "metadata": {"name": "svc", "namespace": "team-a", "uid": "1234-5678", "labels": {"team": "x"}}}


@pytest.mark.parametrize("offload", ["auto", "off", "full"])
def test_children_validate(offload: str) -> None:
    spec = make_spec(cpuOffload={"mode": offload},
                     podTemplate={"spec": {"tolerations": [{"key": "k", "operator": "Exists"}],
                                           "imagePullSecrets": [{"name": "regcred"}]}})
    d = size(spec, [make_node()])
    cm = build_configmap("svc", spec, d)
    children = [cm, build_service("svc", spec), build_deployment("svc", spec, d, config_hash(cm["data"]))]
    kopf.adopt(children, owner=OWNER)
    for child in children:
        assert child["metadata"]["namespace"] == "team-a"
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == "1234-5678" and ref["controller"] is True and ref["kind"] == c.KIND
        kubernetes_validate.validate(child, "1.25.0", strict=True)


def test_children_of_a_volume_model_validate() -> None:
    spec = make_spec(model={"source": "hf", "geometry": "llama-3-8b", "volume": {"claimName": "models", "path": "l3"}})
    d = size(spec, [make_node()])
    dep = build_deployment("svc", spec, d, "h")
    kopf.adopt([dep], owner=OWNER)
    kubernetes_validate.validate(dep, "1.25.0", strict=True)


def test_probe_job_validates() -> None:
    node = node_dict("gpu-1", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G"})
    node["apiVersion"], node["kind"], node["metadata"]["uid"] = "v1", "Node", "n-uid"
    job = build_probe_job(node, "neo/cpu-attention:t", "neo-system")
    kopf.append_owner_reference(job, owner=node)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Node"
    kubernetes_validate.validate(job, "1.25.0", strict=True)
