"""Reading GPU nodes: GPU Feature Discovery labels, allocatable resources, the bandwidth annotation."""

from __future__ import annotations

import json

from neo_operator import constants as c
from neo_operator.nodes import is_gpu_node, matching_nodes, node_facts, parse_bandwidth, select_nodes

from op_helpers import node_dict

H100 = "NVIDIA-H100-80GB-HBM3"


def test_node_facts_from_labels_allocatable_and_annotations() -> None:
    node = node_dict("n1", {c.GPU_PRODUCT_LABEL: H100, c.GPU_MEMORY_LABEL: "81559", c.GPU_COUNT_LABEL: "8"},
                     {"nvidia.com/gpu": "8", "memory": "2000Gi", "cpu": "190500m"},
                     {c.READ_GBPS_ANNOTATION: "210.5",
                      c.PROBE_RESULT_ANNOTATION: json.dumps({"read_gbps": 210.5, "threads": 96})})
    f = node_facts(node)
    assert (f.name, f.gpu_product, f.gpu_memory_mib, f.gpu_count) == ("n1", H100, 81559, 8)
    assert f.memory_bytes == 2000 << 30 and f.cpus == 190.5
    assert (f.read_gbps, f.probe_threads) == (210.5, 96)


def test_memory_falls_back_to_the_product_table_and_count_to_the_label() -> None:
    f = node_facts(node_dict("n", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G", c.GPU_COUNT_LABEL: "4"}, {"memory": "1Gi"}))
    assert f.gpu_memory_mib == 23028 and f.gpu_count == 4 and f.read_gbps is None
    unknown = node_facts(node_dict("n", {c.GPU_PRODUCT_LABEL: "Mystery"}))
    assert unknown.gpu_memory_mib is None and unknown.gpu_count == 0


def test_bandwidth_annotation_parsing() -> None:
    assert parse_bandwidth({}) == (None, None)
    assert parse_bandwidth({c.READ_GBPS_ANNOTATION: "fast"}) == (None, None)
    assert parse_bandwidth({c.READ_GBPS_ANNOTATION: "-1"}) == (None, None)
    assert parse_bandwidth({c.READ_GBPS_ANNOTATION: "42"}) == (42.0, None)  # set by hand, no probe detail


def test_matching_nodes_filters_by_product_and_selector() -> None:
    nodes = [
        node_dict("cpu", {"pool": "a"}),
        node_dict("h100-b", {c.GPU_PRODUCT_LABEL: H100, "pool": "b"}),
        node_dict("h100-a", {c.GPU_PRODUCT_LABEL: H100, "pool": "a"}),
        node_dict("a10g-a", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G", "pool": "a"}),
    ]
    assert not is_gpu_node(nodes[0]) and is_gpu_node(nodes[1])
    names = lambda ns: [n["metadata"]["name"] for n in ns]  # noqa: E731
    assert names(matching_nodes(nodes, [], {})) == ["a10g-a", "h100-a", "h100-b"]
    assert names(matching_nodes(nodes, [H100], {})) == ["h100-a", "h100-b"]
    assert names(matching_nodes(nodes, [H100], {"pool": "a"})) == ["h100-a"]
    assert matching_nodes(nodes, ["NVIDIA-H200"], {}) == []


def test_empty_products_means_every_known_product_and_unknown_nodes_are_counted() -> None:
    nodes = [node_dict("h100", {c.GPU_PRODUCT_LABEL: H100}), node_dict("odd-2", {c.GPU_PRODUCT_LABEL: "Mystery-9"}),
             node_dict("odd-1", {c.GPU_PRODUCT_LABEL: "Mystery-9"}), node_dict("cpu", {})]
    got = select_nodes(nodes, [], {})
    assert [n["metadata"]["name"] for n in got.nodes] == ["h100"] and got.unknown == ["odd-1", "odd-2"]
    assert "ignored 2 node(s)" in got.note() and "odd-1, odd-2" in got.note()
    # named by the user: taken as its word (sizing then asks for spec.gpu.memoryBandwidthGBps)
    named = select_nodes(nodes, ["Mystery-9"], {})
    assert [n["metadata"]["name"] for n in named.nodes] == ["odd-1", "odd-2"] and named.note() == ""


def test_bandwidth_from_the_probe_results_configmap_unless_set_by_hand() -> None:
    from neo_operator.probejob import probe_record

    results = {"a10g-1": probe_record({"read_gbps": 61.54, "threads": 32, "cpu_model": "X"}, now=0),
               "broken": "{not json"}
    probed = node_dict("a10g-1", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G"})
    assert (node_facts(probed, probe_results=results).read_gbps, node_facts(probed, probe_results=results)
            .probe_threads) == (61.5, 32)
    assert node_facts(probed).read_gbps is None  # nothing recorded yet
    assert node_facts(node_dict("broken", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G"}), probe_results=results).read_gbps is None
    by_hand = node_dict("a10g-1", {c.GPU_PRODUCT_LABEL: "NVIDIA-A10G"}, annotations={c.READ_GBPS_ANNOTATION: "12"})
    assert node_facts(by_hand, probe_results=results).read_gbps == 12.0  # an administrator's value wins
