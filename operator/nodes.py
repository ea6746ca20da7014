"""What the operator reads from Node objects: GPU labels, allocatable resources, measured bandwidth.

The bandwidth comes from the node's annotations when an administrator set them by hand, else from
the node's entry in the probe results ConfigMap (:mod:`neo_operator.probes`).

Pure functions over node dicts (``ApiClient().sanitize_for_serialization(node)`` or raw JSON), so
the sizing can be tested without a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Iterable, Mapping

from kubernetes.utils import parse_quantity

from neo_operator import constants as c
from neo_operator.gpus import lookup_product

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """One GPU node as sizing sees it. ``read_gbps`` is None until the probe (or an admin) recorded it."""

    name: str
    gpu_product: str
    gpu_memory_mib: int | None  # per GPU; None when neither the label nor the product table knows
    gpu_count: int
    memory_bytes: int  # allocatable
    cpus: float  # allocatable
    read_gbps: float | None
    probe_threads: int | None


def _labels(node: Mapping[str, Any]) -> dict[str, str]:
    return dict((node.get("metadata") or {}).get("labels") or {})


def _annotations(node: Mapping[str, Any]) -> dict[str, str]:
    return dict((node.get("metadata") or {}).get("annotations") or {})


def is_gpu_node(node: Mapping[str, Any]) -> bool:
    return c.GPU_PRODUCT_LABEL in _labels(node)


def parse_probe_record(record: str | None) -> tuple[float | None, int | None]:
    """(GB/s, threads) from a probe results ConfigMap entry; (None, None) when absent or malformed."""
    if not record:
        return None, None
    try:
        data = json.loads(record)
        gbps = float(data["read_gbps"])
        threads = int(data.get("threads") or 0) or None
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring malformed probe result %r", record)
        return None, None
    return (gbps, threads) if gbps > 0 else (None, None)


def bandwidth(node: Mapping[str, Any], probe_results: Mapping[str, str] | None = None) -> tuple[float | None, int | None]:
    """(GB/s, threads) of ``node``: its hand-set annotation, else its recorded probe result."""
    gbps, threads = parse_bandwidth(_annotations(node))
    if gbps is not None:
        return gbps, threads
    return parse_probe_record((probe_results or {}).get((node.get("metadata") or {}).get("name", "")))


def parse_bandwidth(annotations: Mapping[str, str]) -> tuple[float | None, int | None]:
    """(GB/s, threads) from the node's annotations; (None, None) when absent or malformed."""
    raw = annotations.get(c.READ_GBPS_ANNOTATION)
    if raw is None:
        return None, None
    try:
        gbps = float(raw)
    except ValueError:
        log.warning("ignoring malformed %s=%r", c.READ_GBPS_ANNOTATION, raw)
        return None, None
    if gbps <= 0:
        return None, None
    threads = None
    detail = annotations.get(c.PROBE_RESULT_ANNOTATION)
    if detail:
        try:
            threads = int(json.loads(detail).get("threads") or 0) or None
        except (ValueError, AttributeError, TypeError):
            threads = None
    return gbps, threads


def node_facts(node: Mapping[str, Any], resource_name: str = "nvidia.com/gpu",
               probe_results: Mapping[str, str] | None = None) -> NodeFacts:
    labels = _labels(node)
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    product = labels.get(c.GPU_PRODUCT_LABEL, "")
    memory_mib: int | None = None
    if labels.get(c.GPU_MEMORY_LABEL, "").isdigit():
        memory_mib = int(labels[c.GPU_MEMORY_LABEL])
    elif lookup_product(product):
        memory_mib = lookup_product(product).memory_mib  # type: ignore[union-attr]
    count = 0
    if resource_name in allocatable:
        count = int(parse_quantity(str(allocatable[resource_name])))
    elif labels.get(c.GPU_COUNT_LABEL, "").isdigit():
        count = int(labels[c.GPU_COUNT_LABEL])
    gbps, threads = bandwidth(node, probe_results)
    return NodeFacts(
        name=(node.get("metadata") or {}).get("name", ""),
        gpu_product=product,
        gpu_memory_mib=memory_mib,
        gpu_count=count,
        memory_bytes=int(parse_quantity(str(allocatable.get("memory", "0")))),
        cpus=float(parse_quantity(str(allocatable.get("cpu", "0")))),
        read_gbps=gbps,
        probe_threads=threads,
    )


def matching_nodes(nodes: Iterable[Mapping[str, Any]], products: Iterable[str],
                   node_selector: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """GPU nodes whose labels match the selector and whose product is accepted: one of ``products``, or,
    when none are listed, any product the operator's table knows (see :func:`select_nodes`)."""
    return select_nodes(nodes, products, node_selector).nodes


@dataclasses.dataclass(frozen=True)
class NodeSelection:
    """The nodes a NeoService may be sized for, and the GPU nodes left out for an unknown product."""

    nodes: list[Mapping[str, Any]]
    unknown: list[str]  # names of matching-selector GPU nodes ignored for an unknown product

    def note(self) -> str:
        """What the Sized condition says about the ignored nodes ('' when none)."""
        if not self.unknown:
            return ""
        shown = ", ".join(self.unknown[:5]) + (", ..." if len(self.unknown) > 5 else "")
        return (f"; ignored {len(self.unknown)} node(s) with a GPU product the operator does not know ({shown}): "
                "list it in spec.gpu.products with spec.gpu.memoryBandwidthGBps to use them")


def select_nodes(nodes: Iterable[Mapping[str, Any]], products: Iterable[str],
                 node_selector: Mapping[str, str]) -> NodeSelection:
    """Empty ``products`` means every known product among the nodes that exist: a node with a product
    the table lacks cannot be sized (no HBM bandwidth), so it is ignored and counted rather than
    failing the whole NeoService. Listed products are taken as the user's word."""
    accepted = set(products)
    out, unknown = [], []
    for node in nodes:
        labels = _labels(node)
        if c.GPU_PRODUCT_LABEL not in labels:
            continue
        if any(labels.get(k) != v for k, v in node_selector.items()):
            continue
        if accepted:
            if labels[c.GPU_PRODUCT_LABEL] not in accepted:
                continue
        elif lookup_product(labels[c.GPU_PRODUCT_LABEL]) is None:
            unknown.append(node["metadata"]["name"])
            continue
        out.append(node)
    return NodeSelection(sorted(out, key=lambda n: n["metadata"]["name"]), sorted(unknown))
