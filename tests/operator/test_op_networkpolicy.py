"""The NetworkPolicy builder and the spec.networkPolicy / --metrics-peers parsing."""

from __future__ import annotations

import json

import kopf
import kubernetes_validate
import pytest

from neo_common.settings import ConfigError
from neo_operator import constants as c
from neo_operator.labels import selector_labels
from neo_operator.networkpolicy import PeerError, build_network_policy, parse_metrics_peers
from neo_operator.opconfig import OperatorConfig
from neo_operator.spec import SpecError

from op_helpers import make_spec

OWNER = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "svc", "namespace": "t", "uid": "u-1"}}
PROMETHEUS = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
HTTP = [{"protocol": "TCP", "port": c.GATEWAY_PORT}]


def _valid(policy: dict) -> dict:
    kopf.adopt([policy], owner=OWNER)
    kubernetes_validate.validate(policy, "1.25.0", strict=True)
    return policy


def test_default_admits_the_namespace_only_on_the_http_port() -> None:
    spec = make_spec()
    assert spec.network_policy.enabled
    policy = _valid(build_network_policy("svc", spec.network_policy))
    assert policy["metadata"]["name"] == "svc"
    assert policy["spec"]["podSelector"] == {"matchLabels": selector_labels("svc")}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # one rule: pods of the policy's own namespace; everything else is denied by the policy's existence
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}], "ports": HTTP}]


def test_operator_default_scraper_is_added() -> None:
    policy = _valid(build_network_policy("svc", make_spec().network_policy, (PROMETHEUS,)))
    assert policy["spec"]["ingress"][1] == {"from": [PROMETHEUS], "ports": HTTP}


def test_spec_peers_replace_the_defaults() -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchExpressions": [
        {"key": "role", "operator": "In", "values": ["api"]}]}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
    scraper = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    spec = make_spec(networkPolicy={"from": clients, "metricsFrom": scraper})
    policy = _valid(build_network_policy("svc", spec.network_policy, (PROMETHEUS,)))
    assert policy["spec"]["ingress"] == [{"from": clients, "ports": HTTP}, {"from": scraper, "ports": HTTP}]
    # metricsFrom: [] turns the operator's scraper off for this service
    quiet = make_spec(networkPolicy={"metricsFrom": []})
    assert len(build_network_policy("svc", quiet.network_policy, (PROMETHEUS,))["spec"]["ingress"]) == 1


def test_disabled() -> None:
    assert make_spec(networkPolicy={"enabled": False}).network_policy.enabled is False


@pytest.mark.parametrize("np,hint", [
    ({"from": []}, "admit every source"),
    ({"from": [{"podSelector": {}, "ports": [80]}]}, "unknown field(s) ports"),
    ({"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}}]}, "operator 'Maybe'"),
    ({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}, "cannot be combined"),
    ({"from": [{"podSelector": {"matchLabels": {"a": "has space"}}}]}, "not a valid label value"),
    ({"metricsFrom": "prometheus"}, "must be a list"),
    ({"enabled": "yes"}, "true or false"),
])
def test_bad_peers_name_the_field(np: dict, hint: str) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(networkPolicy=np)
    assert info.value.field.startswith("networkPolicy")
    assert hint in str(info.value)


def test_operator_metrics_peers_flag() -> None:
    assert parse_metrics_peers("") == ()
    assert parse_metrics_peers(json.dumps([PROMETHEUS])) == (PROMETHEUS,)
    with pytest.raises(PeerError):
        parse_metrics_peers("{not json")
    cfg = OperatorConfig.from_args([], env={"NEO_METRICS_PEERS": json.dumps([PROMETHEUS])})
    assert cfg.default_metrics_peers == (PROMETHEUS,)
    with pytest.raises(ConfigError, match="--metrics-peers"):
        OperatorConfig.from_args(["--metrics-peers", '[{"pods": {}}]'])
