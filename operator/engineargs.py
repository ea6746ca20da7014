"""``spec.engineArgs``: extra engine flags, checked by the engine's own parser before anything is written.

The flags are parsed with the argument definitions and validation of
:class:`neo_common.config.NeoConfig` (what ``NeoConfig.from_args`` does, with a parser that raises
instead of exiting), so an unknown flag, a bad value or a combination the engine refuses becomes
``SpecValid=False`` naming it. Flags the operator sets from the spec or the sizing are refused, so
nothing it decided is overridden silently; the message names the spec field that sets each one.
"""

from __future__ import annotations

import argparse
from typing import Mapping, Sequence

from neo_common.config import NeoConfig
from neo_common.settings import ConfigError, Settings

# Engine settings the operator decides (engine_config in configmap.py), with the spec field that sets
# each; the link addresses and the API key are never the spec's to set (the private ipc:// link, and
# spec.apiKeySecretRef so a key never sits in the spec).
OPERATOR_SET: Mapping[str, str] = {
    "model": "spec.model", "load_format": "spec.model.source", "dtype": "spec.model.dtype",
    "served_model_name": "spec.model.servedName", "max_model_len": "spec.model.maxContext",
    "block_size": "spec.engine.blockSize", "num_gpu_blocks": "the sizing (spec.gpu.memoryUtilization)",
    "gpu_memory_utilization": "spec.gpu.memoryUtilization", "num_cpu_blocks": "the sizing (spec.cpuOffload.kvMemory)",
    "max_num_seqs": "spec.engine.maxNumSeqs", "max_num_batched_tokens": "spec.engine.maxNumBatchedTokens",
    "max_waiting": "spec.engine.maxWaiting", "offload_mode": "spec.cpuOffload.mode", "device": "the operator",
    "cpu_threads": "spec.cpuOffload.cores", "tensor_parallel_size": "spec.gpu.count",
    "runtime_dir": "the operator (the pod's private link volume)", "worker_addr": "the operator (the private link)",
    "cpu_attention_addr": "the operator (the private link)", "host": "the operator", "port": "the operator",
    "log_level": "spec.engine.logLevel", "shutdown_grace_s": "spec.shutdownGraceSeconds",
    "api_key": "spec.apiKeySecretRef",
}


# Engine flags that are measuring instruments, never serving modes (docs/design.md, "GPU emulation").
BENCHMARK_ONLY: tuple[str, ...] = ("emulate_gpu",)


class EngineArgsError(ValueError):
    """An engine flag the engine's parser refuses, or one the operator sets itself."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit the operator
        raise EngineArgsError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _RaisingParser(prog="engineArgs", add_help=False, allow_abbrev=False)
    NeoConfig.add_arguments(parser)
    return parser


def parse_engine_args(args: Sequence[str]) -> argparse.Namespace:
    """The flags as the engine parses them (only the fields given); raises :class:`EngineArgsError`."""
    ns = _parser().parse_args(list(args))
    refused = sorted(name for name in vars(ns) if name in OPERATOR_SET)
    if refused:
        raise EngineArgsError("the operator sets " + ", ".join(
            f"{Settings.flag(name)} (from {OPERATOR_SET[name]})" for name in refused) + "; remove it from engineArgs")
    bench = sorted(name for name in vars(ns) if name in BENCHMARK_ONLY)
    if bench:
        raise EngineArgsError(", ".join(Settings.flag(n) for n in bench) + " is a benchmark instrument (GPU "
                              "emulation), not a serving mode; remove it from engineArgs")
    return ns


def apply_engine_args(base: NeoConfig, args: Sequence[str]) -> NeoConfig:
    """``base`` with the flags of ``args`` over it, validated as one engine configuration."""
    if not args:
        return base
    try:
        return NeoConfig.from_namespace(parse_engine_args(args), env=base.to_env())
    except ConfigError as exc:
        raise EngineArgsError(str(exc)) from None
