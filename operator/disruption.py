"""The PodDisruptionBudget: how many of a NeoService's pods a voluntary eviction (a node drain, a
cluster autoscaler scale-down) may take at once. One replica holds whole GPUs and takes minutes to
load, so by default a drain takes them one at a time."""

from __future__ import annotations

from typing import Any

from neo_operator.labels import child_labels, selector_labels
from neo_operator.spec import DisruptionBudgetSpec

# policy/v1 from Kubernetes 1.21; policy/v1beta1 before it (removed in 1.25). The operator picks the
# newest the API server serves.
POLICY_VERSIONS = ("v1", "v1beta1")


def disruption_budget_name(name: str) -> str:
    return name


def build_disruption_budget(name: str, budget: DisruptionBudgetSpec, version: str = "v1") -> dict[str, Any]:
    return {
        "apiVersion": f"policy/{version}",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": disruption_budget_name(name), "labels": child_labels(name)},
        "spec": {"maxUnavailable": budget.max_unavailable, "selector": {"matchLabels": selector_labels(name)}},
    }
