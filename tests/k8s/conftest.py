"""Fixtures of the k8s tests; they live in kube_cluster.py so the tests can import its helpers under
a name no other test folder uses."""

from kube_cluster import cluster, operator  # noqa: F401
