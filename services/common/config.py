"""The stack's configuration: one dataclass per concern, all parsed from the same argv/env.

Every process (`neo serve`, `neo gateway`, `neo gpu-worker`, `neo cpu-attention`) reads the whole
:class:`NeoConfig`, so a launcher (or a Kubernetes ConfigMap through ``NEO_*`` variables) can hand
the same settings to all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from typing import Sequence

from neo_common.enums import OffloadMode
from neo_common.gpu_presets import GPU_PRESETS
from neo_common.link import default_runtime_dir, is_tcp
from neo_common.settings import ConfigError, Settings, option
from neo_common.tensor_parallel import rank_address

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class ModelConfig(Settings):
    """Which weights to serve and how to load them."""

    model: str = option(DEFAULT_MODEL, "HF folder, .gguf file, dummy geometry name, or the embedded default")
    load_format: str = option("auto", "how to read `model`", choices=("auto", "hf", "gguf", "dummy"))
    dtype: str = option("auto", "compute dtype (auto: bfloat16 on CUDA, float32 on CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    served_model_name: str = option("", "name clients use in `model` (default: derived from `model`)")
    tokenizer: str = option("", "HF folder or .gguf with the tokenizer (default: the model's own; "
                                "for dummy weights, the embedded model's)")
    max_model_len: int = option(0, "context length limit in tokens (0: the model's own)")
    seed: int = option(0, "seed for dummy weights")
    quantization: str = option("none", "dense-layer weights: none (as loaded) or fp8 (float8_e4m3fn with "
                                       "per-output-channel scales, quantized at load; FP8 checkpoints are "
                                       "served as FP8 either way)", choices=("none", "fp8"))
    chat_template: str = option("", "chat template: a .jinja file (or a .json with `chat_template`), or the "
                                    "template itself (default: the tokenizer's chat_template.jinja, "
                                    "tokenizer_config.json or GGUF metadata)")
    tool_call_parser: str = option("hermes", "how tool calls are found in the output of a chat request with "
                                             "tools and tool_choice auto (vLLM's --tool-call-parser): hermes "
                                             "(<tool_call>{...}</tool_call>, Hermes/Qwen2.5) or llama3_json "
                                             "(Llama 3.x JSON); none refuses tool_choice auto",
                                   choices=("hermes", "llama3_json", "none"))

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model must not be empty")
        if self.chat_template and not os.path.isfile(self.chat_template) and not (
                "{{" in self.chat_template or "{%" in self.chat_template):
            raise ConfigError(f"--chat-template {self.chat_template!r}: no such file (nor a Jinja template)")
        if self.max_model_len < 0:
            raise ConfigError("--max-model-len must be >= 0")


@dataclasses.dataclass
class CacheConfig(Settings):
    """Paged KV cache geometry and budgets for both pools."""

    block_size: int = option(16, "tokens per KV block")
    num_gpu_blocks: int = option(0, "GPU KV blocks (0: size from --gpu-memory-utilization)")
    gpu_memory_utilization: float = option(0.9, "fraction of device memory the worker may use")
    cpu_device_kv_gb: float = option(1.0, "KV budget in GiB when the worker runs on the CPU device")
    num_cpu_blocks: int = option(0, "host KV blocks for CPU-resident requests (0: size from --cpu-kv-gb "
                                    "when offloading is on)")
    cpu_kv_gb: float = option(4.0, "host KV budget in GiB when --num-cpu-blocks is 0 and offloading is on")
    kv_cache_dtype: str = option("auto", "KV cache dtype (auto: the compute dtype if 16-bit, else bfloat16 "
                                         "with offloading on, else the compute dtype)",
                                 choices=("auto", "bfloat16", "float16", "float32"))
    enable_prefix_caching: bool = option(True, "reuse the GPU KV blocks of prompt prefixes already computed (full "
                                               "blocks, matched by a hash chain over their tokens)")

    def validate(self) -> None:
        if self.block_size not in (8, 16, 32):
            raise ConfigError("--block-size must be 8, 16 or 32")
        if self.num_gpu_blocks < 0 or self.num_cpu_blocks < 0:
            raise ConfigError("--num-gpu-blocks and --num-cpu-blocks must be >= 0")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be within [0.05, 1.0]")
        if self.cpu_device_kv_gb <= 0:
            raise ConfigError("--cpu-device-kv-gb must be > 0")
        if self.cpu_kv_gb <= 0:
            raise ConfigError("--cpu-kv-gb must be > 0")

    def resolve_kv_dtype(self, compute_dtype: str, offload: bool) -> str:
        """The KV dtype name for a compute dtype. The host pool (and so, with offloading, the whole
        KV cache: swaps copy blocks verbatim) holds 16-bit values, which the CPU kernel reads."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        if compute_dtype in ("bfloat16", "float16"):
            return compute_dtype
        return "bfloat16" if offload else compute_dtype


@dataclasses.dataclass
class SchedulerConfig(Settings):
    """Batching budgets and the offload policy."""

    max_num_seqs: int = option(256, "most requests in one iteration")
    max_num_batched_tokens: int = option(2048, "token budget of one iteration (prefill chunks + decodes)")
    max_waiting: int = option(4096, "waiting-queue bound: 429 once running + waiting requests reach "
                                    "--max-num-seqs + this")
    offload_mode: OffloadMode = option(OffloadMode.OFF, "where decodes may run: off (GPU only), auto (NEO: CPU attention only "
                                      "where it hides behind GPU work), throughput (also unhidden when that "
                                      "serves more rows per second), full (every decode on the CPU)",
                               choices=tuple(OffloadMode))
    async_scheduling: bool = option(True, "schedule the next decode step while the worker runs this one (its "
                                          "tokens are fed on the device), so the GPU does not wait for the "
                                          "gateway; steady GPU decoding only")
    swap_in_threshold: float = option(0.95, "swap CPU requests back in while GPU KV use, with their blocks, "
                                            "stays at or below this")
    host_prefix_cache_fraction: float = option(1.0, "with prefix caching and a host KV pool: the share of the host "
                                                     "pool that may keep cached blocks no request holds (blocks the "
                                                     "GPU pool evicts, and CPU-resident requests' blocks); requests "
                                                     "always take them like free blocks. 0: no host tier")
    calibrate_pipeline: bool = option(True, "learn the pipelined plan's extra cost per stage (launches, handoffs, "
                                            "all-reduces) from measured forwards and plan with it")
    cost_tables: str = option("", "cost tables JSON for the offload policy (default: the cached profile of "
                                  "this machine, profiled at the first start)")

    def validate(self) -> None:
        try:
            self.offload_mode = OffloadMode(self.offload_mode)   # callers in code may hand its word
        except ValueError:
            raise ConfigError(f"--offload-mode {self.offload_mode!r}: use one of "
                              f"{', '.join(m.value for m in OffloadMode)}") from None
        if self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be >= 1")
        if self.max_num_batched_tokens < 16:
            raise ConfigError("--max-num-batched-tokens must be >= 16")
        if self.max_waiting < 1:
            raise ConfigError("--max-waiting must be >= 1")
        if not 0.0 < self.swap_in_threshold <= 1.0:
            raise ConfigError("--swap-in-threshold must be within (0, 1]")
        if not 0.0 <= self.host_prefix_cache_fraction <= 1.0:
            raise ConfigError("--host-prefix-cache-fraction must be within [0, 1]")


@dataclasses.dataclass
class DeviceConfig(Settings):
    """Where the GPU worker computes."""

    device: str = option("auto", "torch device for the GPU worker (auto: cuda if present, else cpu)")
    cpu_threads: int = option(0, "threads for CPU attention (0: the CPUs this process may use)")
    kernels: str = option("auto", "GPU kernels: auto (Triton on CUDA when it imports) or torch (the portable "
                                  "twins, for comparison)", choices=("auto", "torch"))
    enforce_eager: bool = option(False, "never capture CUDA graphs (decode launches every kernel from Python)")
    pipeline_graphs: bool = option(True, "with offloading, also capture the pipelined forward's per-layer dense "
                                         "work as CUDA graphs (false: launched from Python, for comparison; the cost "
                                         "tables still price it as replayed)")
    launch_ahead: bool = option(True, "launch each plan the gateway sent ahead before waiting for the previous "
                                      "one's tokens, so the device never idles between iterations (false: reply "
                                      "first, for comparison)")
    tensor_parallel_size: int = option(1, "GPUs the model is sharded over (one worker process and one CPU "
                                          "attention process per GPU; --cpu-threads is split between them)")
    emulate_gpu: str = option("", "benchmarks only: make every GPU stage and host copy last as long as on this "
                                  "slower GPU (t4, a10g, l4, l40s; see docs/design.md, 'GPU emulation'); size the "
                                  "KV pool for it with --num-gpu-blocks. Off when empty")

    def validate(self) -> None:
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.cpu_threads < 0:
            raise ConfigError("--cpu-threads must be >= 0")
        if not 1 <= self.tensor_parallel_size <= 64:
            raise ConfigError("--tensor-parallel-size must be within 1..64")
        if self.emulate_gpu and self.emulate_gpu not in GPU_PRESETS:
            raise ConfigError(f"--emulate-gpu {self.emulate_gpu!r}: use one of {', '.join(GPU_PRESETS)}")
        if self.device.startswith("cuda:") and self.tensor_parallel_size > 1:
            raise ConfigError("--device cuda:N names one GPU; with --tensor-parallel-size use --device cuda "
                              "(rank r takes the r-th visible GPU)")


@dataclasses.dataclass
class IpcConfig(Settings):
    """The links between the processes of one replica (the gateway binds, workers connect).

    By default every link is an ``ipc://`` socket in ``runtime_dir``, a directory only this user
    may enter (in Kubernetes, an ``emptyDir`` that only the pod's containers mount). A ``tcp://``
    address is allowed (tensor-parallel ranks across containers, debugging), and is then always
    authenticated with CurveZMQ keys kept in ``runtime_dir`` (docs/design.md, "The process link").
    """

    runtime_dir: str = option("", "private directory (mode 0700) for the replica's sockets and link keys "
                                  "(default: <tmp>/neo-<uid>-<http port>)")
    worker_addr: str = option("", "ZeroMQ address gateway <-> gpu_worker (default: ipc://<runtime-dir>/worker.sock; "
                                  "tcp://HOST:PORT is authenticated with CurveZMQ)")
    cpu_attention_addr: str = option("", "ZeroMQ address gateway <-> cpu_attention (default: "
                                         "ipc://<runtime-dir>/cpu-attention.sock; of tensor-parallel rank r: "
                                         "the socket path with -tpR, or the tcp port plus r)")
    shm_name: str = option("", "POSIX shared-memory segment for the CPU KV pool (default: per replica)")
    worker_timeout_s: float = option(120.0, "an iteration taking longer than this marks the worker down (it is "
                                            "asked to register again)")
    max_worker_restarts: int = option(3, "crashed workers `neo serve` restarts within 10 minutes before "
                                         "giving up (0: stop at the first crash)")

    def validate(self) -> None:
        for name in ("worker_addr", "cpu_attention_addr"):
            addr = getattr(self, name)
            if addr and not addr.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"--{name.replace('_', '-')} must look like ipc:///PATH or tcp://HOST:PORT")
        if self.runtime_dir and not os.path.isabs(self.runtime_dir):
            raise ConfigError("--runtime-dir must be an absolute path")
        if self.worker_timeout_s <= 0:
            raise ConfigError("--worker-timeout-s must be > 0")
        if self.max_worker_restarts < 0:
            raise ConfigError("--max-worker-restarts must be >= 0")


@dataclasses.dataclass
class HttpConfig(Settings):
    """The OpenAI-compatible HTTP front: its input limits, timeouts, authentication and drain."""

    host: str = option("127.0.0.1", "address the HTTP server listens on")
    port: int = option(8000, "HTTP port")
    max_request_bytes: int = option(4 * 1024 * 1024, "largest accepted request body (chunked bodies too)")
    max_tokens_limit: int = option(0, "largest accepted max_tokens (0: context length)")
    max_stop_strings: int = option(16, "most stop strings per request")
    max_stop_length: int = option(256, "longest stop string in characters")
    api_key: str = option("", "API keys (comma-separated) clients must send as `Authorization: Bearer KEY` "
                              "(empty: no authentication)", secret=True)
    protect_metrics: bool = option(False, "require the API key for /metrics too (/health and /ready stay open)")
    header_timeout_s: float = option(10.0, "a client must send its request line and headers within this time")
    body_timeout_s: float = option(30.0, "a client must send its whole request body within this time")
    keep_alive_s: float = option(5.0, "an idle keep-alive connection is closed after this long")
    max_connections: int = option(2048, "most open HTTP connections; beyond it new ones get 503")
    shutdown_grace_s: float = option(30.0, "after SIGTERM, in-flight requests get this long to finish (new "
                                           "ones get 503) before the processes stop")
    log_level: str = option("info", "logging level", choices=("debug", "info", "warning", "error"))
    allowed_origins: str = option("", "CORS: origins browsers may call from (a JSON list or comma-separated; "
                                      "`*` for any; empty: no CORS headers, where vLLM allows any)")
    allowed_methods: str = option("*", "CORS: allowed methods (a JSON list or comma-separated)")
    allowed_headers: str = option("*", "CORS: allowed request headers (a JSON list or comma-separated)")
    allow_credentials: bool = option(False, "CORS: allow credentials (cookies, Authorization) in cross-origin "
                                            "requests")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("--port must be within 0..65535")
        if self.max_request_bytes < 1024:
            raise ConfigError("--max-request-bytes must be >= 1024")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be >= 1")
        if self.shutdown_grace_s < 0:
            raise ConfigError("--shutdown-grace-s must be >= 0")
        if self.api_key and not self.api_keys:
            raise ConfigError("--api-key holds no key (only commas and spaces)")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            try:
                _text_list(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
        if self.allow_credentials and "*" in self.cors_origins:
            raise ConfigError("--allow-credentials needs explicit --allowed-origins (browsers refuse credentials "
                              "with the origin `*`)")

    @property
    def cors_origins(self) -> list[str]:
        return _text_list(self.allowed_origins)

    @property
    def cors_methods(self) -> list[str]:
        return _text_list(self.allowed_methods)

    @property
    def cors_headers(self) -> list[str]:
        return _text_list(self.allowed_headers)

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted keys (``--api-key`` split on commas, blanks dropped)."""
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip())


def _text_list(text: str) -> list[str]:
    """A list flag as vLLM writes it (a JSON list of strings) or comma-separated."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list: {exc}") from None
        if not all(isinstance(i, str) for i in items):
            raise ValueError("a JSON list of strings is expected")
        return items
    return [part.strip() for part in text.split(",") if part.strip()]


SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, DeviceConfig, IpcConfig, HttpConfig)


@dataclasses.dataclass
class NeoConfig:
    """Everything one replica needs; each field is one section above."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    device: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    ipc: IpcConfig = dataclasses.field(default_factory=IpcConfig)
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        if self.offload_enabled and self.cache.kv_cache_dtype == "float32":
            raise ConfigError("--kv-cache-dtype float32 cannot be offloaded: the CPU attention kernel reads "
                              "bfloat16 or float16 KV; pick one of those or --offload-mode off")

    @property
    def offload_enabled(self) -> bool:
        return self.scheduler.offload_mode.offloads

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        for section in SECTIONS:
            section.add_arguments(parser)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, env: dict[str, str] | None = None) -> "NeoConfig":
        env = dict(os.environ) if env is None else env
        parts = [section.from_namespace(ns, env) for section in SECTIONS]
        return cls(*parts)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> "NeoConfig":
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), env)

    @classmethod
    def for_process(cls, prog: str, description: str | None, argv: Sequence[str] | None, role: str) -> "NeoConfig":
        """Parse a process's argv (+ NEO_* env) and set up its logging: the start of every `neo` process."""
        from neo_common.logs import setup_logging

        parser = argparse.ArgumentParser(prog=prog, description=description)
        cls.add_arguments(parser)
        config = cls.from_namespace(parser.parse_args(argv))
        setup_logging(config.http.log_level, role)
        return config

    def to_args(self) -> list[str]:
        return [arg for section in self.sections() for arg in section.to_args()]

    def to_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for section in self.sections():
            env.update(section.to_env())
        return env

    def secret_env(self) -> dict[str, str]:
        """The secret settings (API keys) as environment variables: `neo serve` hands them to its
        children this way, never as flags (any local user can read a process's argv)."""
        env: dict[str, str] = {}
        for section in self.sections():
            env.update(section.secret_env())
        return env

    def sections(self) -> list[Settings]:
        return [self.model, self.cache, self.scheduler, self.device, self.ipc, self.http]

    @property
    def runtime_dir(self) -> str:
        """The replica's private directory for its sockets and link keys (neo_common.link)."""
        return self.ipc.runtime_dir or default_runtime_dir(self.http.port)

    @property
    def worker_addr(self) -> str:
        """The gateway <-> gpu_worker address: as given, else a socket in the runtime directory."""
        return self.ipc.worker_addr or "ipc://" + os.path.join(self.runtime_dir, "worker.sock")

    @property
    def cpu_attention_addr(self) -> str:
        """The gateway <-> cpu_attention address (of this config's rank: see ``for_rank``)."""
        return self.ipc.cpu_attention_addr or "ipc://" + os.path.join(self.runtime_dir, "cpu-attention.sock")

    @property
    def uses_tcp(self) -> bool:
        """Whether any link of the replica is tcp:// (and so needs the CurveZMQ keys)."""
        return any(is_tcp(a) for a in (self.worker_addr, self.cpu_attention_addr))

    @property
    def shm_name(self) -> str:
        """Segment name: explicit, else unique per replica so two replicas on a host don't clash
        (the cpu_attention port for tcp links, a digest of the socket path for ipc ones)."""
        if self.ipc.shm_name:
            return self.ipc.shm_name
        addr = self.cpu_attention_addr
        if is_tcp(addr):
            return "neo-kv-" + addr.rsplit(":", 1)[-1]
        return "neo-kv-" + hashlib.sha1(addr.encode()).hexdigest()[:12]

    def for_rank(self, rank: int) -> "NeoConfig":
        """What tensor-parallel rank ``rank`` uses: its own cpu_attention address and host KV segment
        (rank 0's are the configured ones), so each rank's CPU attention serves only its heads."""
        if rank == 0:
            return self
        ipc = dataclasses.replace(self.ipc, cpu_attention_addr=rank_address(self.cpu_attention_addr, rank),
                                  shm_name=f"{self.shm_name}-tp{rank}", runtime_dir=self.runtime_dir)
        return dataclasses.replace(self, ipc=ipc)
