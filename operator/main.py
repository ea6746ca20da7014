"""``neo operator``: run the NeoService operator (kopf) with this package's handlers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
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
    # Equal priorities make every peer pause (kopf's rule against double handling): a random one
    # per replica, so two replicas never tie.
    priority = config.priority or random.SystemRandom().randint(1, 2**31 - 1)
    log.info("neo operator starting (namespaces: %s; %s)", ",".join(config.namespace) or "all",
             f"peering {config.peering!r}, priority {priority}" if config.peering else "standalone")
    asyncio.run(kopf.operator(
        clusterwide=not config.namespace,
        namespaces=config.namespace,
        standalone=not config.peering,
        peering_name=config.peering or None,
        priority=priority,
        liveness_endpoint=config.liveness or None,
        memo=memo,
    ))
    return 0
