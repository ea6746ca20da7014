"""The choices of one request: ``n`` samples of each of its prompts, run as independent sequences
and read as one stream of ``(index, RequestOutput)``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

from neo_gateway.async_engine import RequestOutput, RequestStream
from neo_gateway.errors import APIError
from neo_gateway.sampling_params import SamplingParams

_SEED_SPACE = 2**63


@dataclasses.dataclass
class Choice:
    """One output sequence: its ``index`` in the response (prompt * n + sample), its prompt, its params."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


def choices_of(prompts: list[tuple[list[int], SamplingParams]], n: int) -> list[list[Choice]]:
    """``n`` choices per prompt, grouped by prompt. With a seed, sample i draws from seed + i: each
    choice differs from the others, the whole response is reproducible, and choice 0 is what the
    same request with n=1 gives. Only the first of a prompt computes its prompt logprobs (the
    others take its cached blocks; the prompt's logprobs are the same for all)."""
    groups = []
    for p, (ids, params) in enumerate(prompts):
        follower = dataclasses.replace(params, prompt_logprobs=None)
        groups.append([Choice(p * n + i, ids, params if i == 0 else follower if params.seed is None else
                              dataclasses.replace(follower, seed=(params.seed + i) % _SEED_SPACE))
                       for i in range(n)])
    return groups


def best_of(outputs: dict[int, "RequestOutput"], n: int, best: int) -> dict[int, "RequestOutput"]:
    """Of each prompt's ``best`` sequences (indices prompt * best + i), the ``n`` with the highest
    cumulative logprob, best first, indexed prompt * n + rank (vLLM's best_of). The prompt's
    logprobs (computed by its first sequence) go with each."""
    out: dict[int, RequestOutput] = {}
    for p in range(len(outputs) // best):
        group = [outputs[p * best + i] for i in range(best)]
        ranked = sorted(group, key=lambda o: o.cumulative_logprob, reverse=True)[:n]
        for rank, o in enumerate(ranked):
            out[p * n + rank] = dataclasses.replace(o, prompt_logprobs=group[0].prompt_logprobs)
    return out


class ChoiceStreams:
    """Runs the choices of one request and merges their outputs in arrival order.

    Each prompt's first choice is submitted by :meth:`start` (a refusal there, such as a full
    queue, refuses the request); its other choices once its first output arrives: the prompt's full
    blocks are then registered in the GPU prefix cache, so they take them instead of prefilling the
    prompt again (submitted together, all would be admitted before any block is cached). A later
    choice that cannot be submitted ends with an error output.

    - ``count``: choices in all; ``streams``: those submitted (closed by :meth:`aclose`).
    """

    def __init__(self, groups: list[list[Choice]], submit: Callable[[Choice], RequestStream],
                 close: Callable[[RequestStream], None]) -> None:
        self.groups, self.submit, self.close = groups, submit, close
        self.count = sum(len(g) for g in groups)
        self.streams: list[RequestStream] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        leaders = []
        try:
            for group in self.groups:
                leaders.append(self.submit(group[0]))
                self.streams.append(leaders[-1])
        except BaseException:
            await self.aclose()
            raise
        for group, leader in zip(self.groups, leaders):
            self.tasks.append(asyncio.ensure_future(self._lead(group, leader)))

    async def _lead(self, group: list[Choice], leader: RequestStream) -> None:
        followers_started = False
        async for out in self._outputs(group[0].index, leader):
            if not followers_started:
                followers_started = True
                for choice in group[1:]:
                    try:
                        stream = self.submit(choice)
                    except APIError as exc:
                        self.queue.put_nowait((choice.index, _failed(exc.message)))
                        continue
                    self.streams.append(stream)
                    self.tasks.append(asyncio.ensure_future(self._pump(choice.index, stream)))

    async def _pump(self, index: int, stream: RequestStream) -> None:
        async for _ in self._outputs(index, stream):
            pass

    async def _outputs(self, index: int, stream: RequestStream):
        """Forward a stream's outputs to the merged queue (and yield them); a failure is an error output."""
        try:
            async for out in stream:
                self.queue.put_nowait((index, out))
                yield out
        except Exception as exc:  # noqa: BLE001 (reported to the client as that choice's error)
            self.queue.put_nowait((index, _failed(f"internal error: {type(exc).__name__}")))

    def __aiter__(self):
        return self._merged()

    async def _merged(self):
        finished = 0
        while finished < self.count:
            index, out = await self.queue.get()
            finished += out.finished
            yield index, out

    async def aclose(self) -> None:
        """Abort every unfinished choice, then reap the forwarding tasks. The aborts come first and
        without an ``await``: this runs in the ``finally`` of a response whose client hung up, and
        there the first ``await`` is cancelled again (the server cancels the whole task scope)."""
        for task in self.tasks:
            task.cancel()
        for stream in self.streams:
            self.close(stream)
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _failed(message: str) -> RequestOutput:
    return RequestOutput("", [], True, "error", error=message)
