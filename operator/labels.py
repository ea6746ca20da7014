"""Labels of the children of one NeoService."""

from __future__ import annotations

from neo_operator import constants as c


def selector_labels(name: str) -> dict[str, str]:
    """The immutable part: what the Deployment selects and the Service routes to."""
    return {c.NAME_LABEL: c.APP_NAME, c.INSTANCE_LABEL: name}


ENGINE_COMPONENT = "server"  # the component label of the engine pods (and the other children)


def child_labels(name: str, component: str = ENGINE_COMPONENT) -> dict[str, str]:
    return {**selector_labels(name), c.COMPONENT_LABEL: component, c.MANAGED_BY_LABEL: c.MANAGED_BY,
            c.SERVICE_LABEL: name}


def selector_string(name: str) -> str:
    """``status.selector`` for the scale subresource (HPA reads pods through it)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def engine_pod_selector(name: str) -> str:
    """The engine pods of one NeoService (not its model-inspection pods, which share the selector labels)."""
    return f"{selector_string(name)},{c.COMPONENT_LABEL}={ENGINE_COMPONENT}"
