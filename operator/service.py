"""The Service in front of the gateways of all replicas."""

from __future__ import annotations

from typing import Any

from neo_operator import constants as c
from neo_operator.labels import child_labels, selector_labels
from neo_operator.spec import NeoServiceSpec


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{c.GATEWAY_PORT}"


def build_service(name: str, spec: NeoServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": child_labels(name)},
        "spec": {
            "type": spec.service_type,
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": c.GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
