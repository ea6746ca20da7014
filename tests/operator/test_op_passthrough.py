"""spec.env, spec.envFrom, spec.engineArgs and the PodDisruptionBudget: what reaches the engine
containers, what the engine's own parser refuses, what the operator keeps for itself."""

from __future__ import annotations

import kubernetes_validate
import pytest

from neo_common.config import NeoConfig
from neo_operator.configmap import build_configmap
from neo_operator.deployment import build_deployment
from neo_operator.disruption import build_disruption_budget
from neo_operator.engineargs import EngineArgsError, apply_engine_args
from neo_operator.sizing import size
from neo_operator.spec import SpecError

from op_helpers import make_node, make_spec

ENV = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4317"},
       {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
ENV_FROM = [{"secretRef": {"name": "tracing"}}, {"configMapRef": {"name": "extra"}, "prefix": "X_"}]


def test_env_and_env_from_reach_every_engine_container_with_the_operators_config_last() -> None:
    spec = make_spec(env=ENV, envFrom=ENV_FROM, cpuOffload={"mode": "full"})
    dep = build_deployment("svc", spec, size(spec, [make_node()]), "abc123")
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert [ct["name"] for ct in containers] == ["gateway", "gpu-worker", "cpu-attention"]
    for ct in containers:
        assert ct["env"][-2:] == ENV and ct["envFrom"][:2] == ENV_FROM
        assert ct["envFrom"][-1] == {"configMapRef": {"name": "svc-config-abc123"}}  # NEO_* from ours win
    kubernetes_validate.validate(dep, "1.25.0", strict=True)


@pytest.mark.parametrize("env, words", [
    ([{"name": "NEO_MAX_NUM_SEQS", "value": "4"}], "spec.engineArgs"),
    ([{"name": "HOME", "value": "/root"}], "set by the operator"),
    ([{"value": "x"}], "needs a name"),
])
def test_env_the_operator_owns_is_refused(env: list, words: str) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(env=env)
    assert info.value.field.startswith("env[0]") and words in str(info.value)


def test_engine_args_land_in_the_configmap() -> None:
    spec = make_spec(engineArgs=["--enable-prefix-caching", "false", "--seed", "7"])
    data = build_configmap("svc", spec, size(spec, [make_node()]))["data"]
    cfg = NeoConfig.from_args([], env=data)
    assert cfg.cache.enable_prefix_caching is False and data["NEO_SEED"] == "7"
    plain = make_spec()
    assert build_configmap("svc", plain, size(plain, [make_node()]))["data"]["NEO_ENABLE_PREFIX_CACHING"] == "true"


@pytest.mark.parametrize("args, words", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--seed", "seven"], "--seed: invalid int value"),
    (["--max-num-seqs", "8"], "--max-num-seqs (from spec.engine.maxNumSeqs)"),
    (["--api-key", "k"], "--api-key (from spec.apiKeySecretRef)"),
    (["--worker-addr", "tcp://0.0.0.0:5555"], "--worker-addr"),
    (["--num-gpu-blocks=9"], "--num-gpu-blocks (from the sizing"),
    (["stray"], "unrecognized arguments: stray"),
    (["--emulate-gpu", "t4"], "--emulate-gpu is a benchmark instrument"),
])
def test_bad_or_operator_owned_engine_args_are_refused_naming_them(args: list, words: str) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(engineArgs=args)
    assert info.value.field == "engineArgs" and words in str(info.value), str(info.value)


def test_engine_args_checked_together_with_the_decided_config() -> None:
    """A flag that parses alone but not with what the operator decided: the engine's own check refuses it."""
    base = NeoConfig.from_args(["--offload-mode", "full"], env={})
    with pytest.raises(EngineArgsError, match="float32"):
        apply_engine_args(base, ["--kv-cache-dtype", "float32"])


def test_disruption_budget_defaults_to_one_and_takes_a_percentage() -> None:
    pdb = build_disruption_budget("svc", make_spec().disruption_budget)
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "neo", "app.kubernetes.io/instance": "svc"}
    kubernetes_validate.validate(pdb, "1.25.0", strict=True)
    assert make_spec(disruptionBudget={"maxUnavailable": "25%"}).disruption_budget.max_unavailable == "25%"
    assert build_disruption_budget("svc", make_spec().disruption_budget, "v1beta1")["apiVersion"] == "policy/v1beta1"
    for bad in ("lots", "150%", -1):
        with pytest.raises(SpecError, match="disruptionBudget.maxUnavailable"):
            make_spec(disruptionBudget={"maxUnavailable": bad})
