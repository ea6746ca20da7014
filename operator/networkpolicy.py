"""The NetworkPolicy of one NeoService: who may reach the gateways' HTTP port, and nobody else.

The pods' only listening port is the gateway's HTTP port (the containers of a pod talk over Unix
sockets in a private volume, never over the network). The policy admits, on that port only, the
pods of the NeoService's own namespace (or the peers ``spec.networkPolicy.from`` names) plus the
metrics scraper (``spec.networkPolicy.metricsFrom``, else the operator's ``--metrics-peers``,
which the chart fills from ``networkPolicy.metricsFrom``); every other ingress is denied. Metrics
are served on the same port (``GET /metrics``), so a scraper peer can reach the API too: the API
key, not the policy, keeps it out of the completions.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

from neo_operator import constants as c
from neo_operator.labels import child_labels, selector_labels

PEER_KEYS = ("namespaceSelector", "podSelector", "ipBlock")
SELECTOR_KEYS = ("matchLabels", "matchExpressions")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class PeerError(ValueError):
    """A peer list that is not a list of NetworkPolicyPeer objects; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class NetworkPolicySpec:
    """``spec.networkPolicy``: on by default; ``from_peers`` None means "the NeoService's namespace",
    ``metrics_peers`` None means "the operator's default scraper peers"."""

    enabled: bool = True
    from_peers: tuple[dict[str, Any], ...] | None = None
    metrics_peers: tuple[dict[str, Any], ...] | None = None


def _check_selector(where: str, selector: Any) -> None:
    if not isinstance(selector, Mapping):
        raise PeerError(f"{where} must be a label selector object")
    unknown = sorted(set(selector) - set(SELECTOR_KEYS))
    if unknown:
        raise PeerError(f"{where}: unknown field(s) {', '.join(unknown)}; a selector has matchLabels, matchExpressions")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        raise PeerError(f"{where}.matchLabels must be a map of label keys to values")
    for key, value in labels.items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise PeerError(f"{where}.matchLabels[{key}]: {value!r} is not a valid label value")
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        if not isinstance(expr, Mapping) or not expr.get("key"):
            raise PeerError(f"{where}.matchExpressions[{i}] needs a key")
        if expr.get("operator") not in SELECTOR_OPERATORS:
            raise PeerError(f"{where}.matchExpressions[{i}].operator {expr.get('operator')!r} is not one of "
                            f"{', '.join(SELECTOR_OPERATORS)}")


def check_peers(where: str, peers: Any) -> tuple[dict[str, Any], ...]:
    """Validate a list of NetworkPolicyPeer objects (what a v1.20 CRD schema cannot fully check)."""
    if not isinstance(peers, Sequence) or isinstance(peers, (str, bytes)):
        raise PeerError(f"{where or 'the value'} must be a list of peers (namespaceSelector / podSelector / ipBlock)")
    out = []
    for i, peer in enumerate(peers):
        at = f"{where}[{i}]"
        if not isinstance(peer, Mapping) or not peer:
            raise PeerError(f"{at} must be an object with namespaceSelector, podSelector or ipBlock")
        unknown = sorted(set(peer) - set(PEER_KEYS))
        if unknown:
            raise PeerError(f"{at}: unknown field(s) {', '.join(unknown)}; use {', '.join(PEER_KEYS)}")
        if "ipBlock" in peer:
            if len(peer) > 1:
                raise PeerError(f"{at}: ipBlock cannot be combined with a selector")
            block = peer["ipBlock"]
            if not isinstance(block, Mapping) or not isinstance(block.get("cidr"), str) or "/" not in block["cidr"]:
                raise PeerError(f"{at}.ipBlock needs a cidr such as 10.0.0.0/8")
        for key in ("namespaceSelector", "podSelector"):
            if key in peer:
                _check_selector(f"{at}.{key}", peer[key])
        out.append(json.loads(json.dumps(peer)))  # a deep, plain copy
    return tuple(out)


def parse_metrics_peers(text: str) -> tuple[dict[str, Any], ...]:
    """The operator's ``--metrics-peers`` (a JSON list of peers; empty text: none)."""
    if not text.strip():
        return ()
    try:
        return check_peers("--metrics-peers", json.loads(text))
    except ValueError as exc:
        raise PeerError(f"--metrics-peers: {exc}") from None


def network_policy_name(name: str) -> str:
    return name


def build_network_policy(name: str, spec: NetworkPolicySpec,
                         default_metrics_peers: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Ingress to the gateways' HTTP port from the allowed peers only (policyTypes Ingress)."""
    port = [{"protocol": "TCP", "port": c.GATEWAY_PORT}]
    clients = list(spec.from_peers) if spec.from_peers is not None else [{"podSelector": {}}]  # own namespace
    metrics = list(spec.metrics_peers) if spec.metrics_peers is not None else [dict(p) for p in default_metrics_peers]
    ingress = [{"from": clients, "ports": port}]
    if metrics:
        ingress.append({"from": metrics, "ports": port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(name), "labels": child_labels(name, "network-policy")},
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
