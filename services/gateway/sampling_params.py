"""Per-request generation settings (vLLM's ``SamplingParams``), validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neo_gateway.structured_output.spec import StructuredOutputSpec

from neo_common.protocol import MAX_LOGPROBS
from neo_gateway.param_error import ParamError




@dataclasses.dataclass
class SamplingParams:
    """How to pick and when to stop generating tokens.

    ``temperature`` 0 means greedy; ``top_k`` -1 and ``top_p`` 1.0 disable those filters; ``seed``
    None draws from the worker's generator; ``stop`` strings end the text before the match;
    ``stop_token_ids`` and (unless ``ignore_eos``) the model's EOS tokens end it after the token,
    whose text is left out unless ``include_stop_str_in_output`` (which also keeps a matched stop
    string); neither a stop token nor a stop string ends it within the first ``min_tokens`` tokens.
    ``skip_special_tokens`` and ``spaces_between_special_tokens`` shape the text as in vLLM.
    ``min_p`` (0 = off) drops tokens less likely than ``min_p`` times the likeliest; ``logit_bias``
    (token id -> value in [-100, 100]) is added to the logits before sampling, greedy included.
    Penalties as vLLM's: ``repetition_penalty`` divides positive (multiplies negative) logits of
    tokens in the prompt or the output; ``frequency_penalty`` x count and ``presence_penalty`` are
    subtracted for tokens in the output.
    ``structured_outputs`` (None = free text): the grammar the output follows (vLLM's field of that
    name; a ``structured_output.StructuredOutputSpec``, compiled by the engine's manager).
    ``logprobs`` (None = off): return each generated token's logprob and the top that many;
    ``prompt_logprobs`` likewise for every prompt token after the first (the request then skips the
    prefix cache: every prompt position must be computed).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_p: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured_outputs: "StructuredOutputSpec | None" = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ParamError("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ParamError("top_k", f"top_k must be -1 (disabled) or at least 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ParamError("seed", f"seed must be in [0, 2^63), got {self.seed}")
        if any(not s for s in self.stop):
            raise ParamError("stop", "stop strings must not be empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                           f"got {self.min_tokens}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if any(t < 0 for t in self.logit_bias) or any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise ParamError("logit_bias", "logit_bias maps token ids (>= 0) to values in [-100, 100]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ParamError(name, f"{name} must be in [-2, 2], got {value}")
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise ParamError("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ParamError(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", "stop_token_ids must be non-negative")

    def to_wire(self) -> dict:
        """Its fields as plain values (``AddRequest.params``); ``from_wire`` validates them again."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        spec = self.structured_outputs
        if spec is not None:
            d["structured_outputs"] = {"kind": spec.kind.value, "text": spec.text,
                                       "whitespace_pattern": spec.whitespace_pattern, "param": spec.param}
        return d

    @classmethod
    def from_wire(cls, fields: dict) -> "SamplingParams":
        from neo_gateway.structured_output.spec import StructuredOutputKind, StructuredOutputSpec

        d = dict(fields)
        spec = d.get("structured_outputs")
        if spec is not None:
            d["structured_outputs"] = StructuredOutputSpec(StructuredOutputKind(spec["kind"]), spec["text"],
                                                           spec["whitespace_pattern"], spec["param"])
        d["logit_bias"] = {int(k): float(v) for k, v in d.get("logit_bias", {}).items()}
        return cls(**d)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
