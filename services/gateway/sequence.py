"""A request's generation state as the scheduler sees it."""

from __future__ import annotations

import enum
import time

from neo_common.enums import FinishReason
from neo_common.protocol import Place
from neo_gateway.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued; no KV (new, or preempted by recompute)
    RUNNING = "running"      # holds KV blocks; prefilling (chunk by chunk) or decoding
    FINISHED = "finished"


class Sequence:
    """One request (n=1) from admission to finish.

    - ``prompt_ids``: fixed at admission. ``output_ids``: grows by one per sampled token.
    - ``num_computed``: tokens whose KV is in the pool; reset to 0 when preempted by recompute.
    - ``place``: which pool holds the KV (GPU only until CPU offloading is on).
    - ``status``/``finish_reason``: lifecycle; set by the scheduler and the engine.
    - ``arrival`` (the API server's, by default now)/``scheduled_time``/``first_token_time``/
      ``last_token_time``: monotonic times (one clock for the processes of a host).
    - ``traceparent``: the W3C context of the request's span in the API server (None: not traced),
      parent of the workers' iteration spans.
    - ``block_hashes``: the prefix-cache hash chain of its full blocks computed so far.
    - ``structured``: its grammar's matcher (``params.structured_outputs``; None: free text),
      advanced by the engine with each accepted token.
    - ``prompt_logprobs``: per prompt position 1.., its logprob and top ones
      (``params.prompt_logprobs``), filled in order as the prefill computes them;
      ``cumulative_logprob``: the sum of the output tokens' logprobs (when ``params.logprobs``).
    """

    def __init__(self, seq_id: int, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...], max_model_len: int, arrival: float | None = None) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.max_model_len = max_model_len
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.num_computed = 0
        self.place = Place.GPU
        self.status = SeqStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.arrival = time.monotonic() if arrival is None else arrival
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.traceparent: str | None = None
        self.block_hashes: list[bytes] = []   # prefix-cache hashes of its full blocks (PrefixHasher)
        self.num_registered_blocks = 0        # of its GPU table's blocks, those registered in the cache
        self.structured = None                # structured_output.StructuredOutputRequest (engine.submit)
        self.prompt_logprobs: list = []       # logprobs.TokenLogprob per prompt token from the second on
        self.cumulative_logprob = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet (so its prefill cannot start
        after cached blocks: it must compute every prompt position)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def prompt_logprob_span(self, start: int, num_tokens: int) -> tuple[int, int] | None:
        """(first, count): the positions of the chunk ``[start, start + num_tokens)`` whose next-token
        logprobs are still missing, the first as an offset into the chunk; None: none is."""
        if not self.needs_prompt_logprobs or len(self.prompt_logprobs) < start:   # (a gap: never when uncached)
            return None
        first = max(start, len(self.prompt_logprobs))      # position p predicts prompt token p + 1
        last = min(start + num_tokens, len(self.prompt_ids) - 1)
        return (first - start, last - first) if last > first else None

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt, or the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token: int) -> FinishReason | None:
        """Record a sampled token; returns why generation ends now, if it does."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token)
        # within the first min_tokens tokens a stop token is an ordinary token (vLLM's min_tokens)
        if token in self.stop_ids and len(self.output_ids) > self.params.min_tokens:
            return FinishReason.STOP
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
