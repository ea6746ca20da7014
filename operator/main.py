"""``neo operator``: run the NeoService operator (kopf) with this package's handlers."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Sequence

import kopf
from kubernetes import config as kube_config

from neo_operator.opconfig import OperatorConfig

log = logging.getLogger(__name__)


def load_kube_config() -> None:
    """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG / ~/.kube/config."""
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neo operator", description=__doc__)
    OperatorConfig.add_arguments(parser)
    config = OperatorConfig.from_namespace(parser.parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if config.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_kube_config()
    from neo_operator import handlers  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(config=config)
    log.info("neo operator starting (namespaces: %s)", ",".join(config.namespace) or "all")
    asyncio.run(kopf.operator(
        clusterwide=not config.namespace,
        namespaces=config.namespace,
        standalone=True,  # one replica (the chart's Deployment uses Recreate); no peering objects needed
        liveness_endpoint=config.liveness or None,
        memo=memo,
    ))
    return 0
