"""The enumerations every process shares: on the command line, in the protocol, in shared memory.

String-valued ones (``OffloadMode``) compare equal to their value and print as it, so a flag, an
environment variable, a ConfigMap entry and the code all read the same word. Integer-valued ones
mirror a number another process writes (the segment's CPU state word, the native kernel's status).
"""

from __future__ import annotations

import enum


class WordEnum(str, enum.Enum):
    """A string enum that prints (``str``, ``repr``) as its value, as flags and tables show it."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


class OffloadMode(WordEnum):
    """Where decodes may run (``--offload-mode``; docs/design.md, "The offload policy and cost tables")."""

    OFF = "off"                # GPU only, no host pool
    AUTO = "auto"              # NEO: CPU attention only where it hides behind GPU work
    FULL = "full"              # every whole prompt to the host pool (for comparisons)
    THROUGHPUT = "throughput"  # also unhidden CPU attention when that serves more rows per second

    @property
    def offloads(self) -> bool:
        return self is not OffloadMode.OFF


class CpuState(enum.IntEnum):
    """The shared segment's ``cpu_state`` word, written by the cpu_attention process."""

    DETACHED = 0   # no process attached yet (it may be starting)
    ATTACHED = 1   # a process serves the segment (its pid is in ``cpu_pid``)
    EXITED = 2     # the process left on purpose


class KvDtypeCode(enum.IntEnum):
    """How the segment header and the native kernel name the host pool's 16-bit KV dtype."""

    bfloat16 = 0
    float16 = 1


class NativeStatus(enum.IntEnum):
    """Return codes of the native kernel (``neo_status`` in ``host_kernel/csrc/neo_attn.h``)."""

    OK = 0
    INVALID_ARGUMENT = -1
    BLOCK_OUT_OF_RANGE = -2
    BAD_SEQUENCE_LENGTH = -3
    NO_DOORBELL = -4       # a serve slice ended with no doorbell rung for a while: call again
    ABORTED = -5           # the GPU worker cancelled the iteration
    OUT_OF_MEMORY = -6


class FinishReason(str, enum.Enum):
    """Why a request's generation ended (the OpenAI ``finish_reason`` words, plus vLLM's abort)."""

    STOP = "stop"            # EOS, a stop token, a stop string or a complete grammar
    LENGTH = "length"        # max_tokens or the context length
    ABORT = "abort"          # the client went away
    ERROR = "error"          # a worker failed while the request was in flight, or it left its grammar
