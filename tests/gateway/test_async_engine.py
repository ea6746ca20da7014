"""The API server's side of the engine core boundary: outputs detokenized and streamed, stop strings
and failures ending requests, aborts told to the core, no request left behind. The test plays the
engine core on the other end of a real PAIR socket (the core itself runs in the replica tests)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq.asyncio

from neo_common.config import NeoConfig
from neo_common.engine_core_protocol import (CORE_SILENCE_S, NO_TOKEN, RUNNING, AbortRequests, AddRequest, EngineCoreOutputs,
                                             EngineStatus, core_address, decode, finish_code, finish_reason,
                                             pair_socket)
from neo_common.enums import FinishReason
from neo_common.model_source import embedded_gguf_path
from neo_gateway.async_engine import AsyncEngine, EngineOverloaded
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_gguf(embedded_gguf_path())


class CoreEnd:
    """The engine core's end of the socket: reads what the API server sends, sends it outputs."""

    def __init__(self, sock) -> None:
        self.sock = sock

    async def recv(self):
        return decode(await asyncio.wait_for(self.sock.recv(), 5))

    def send_rows(self, rows: list[tuple], details: dict | None = None) -> None:
        """rows: (seq_id, token, finish reason or None); details: row index -> map."""
        details = details or {}
        self.sock.send(EngineCoreOutputs(
            seq_ids=np.array([r[0] for r in rows], np.int64), token_ids=np.array([r[1] for r in rows], np.int32),
            finish=np.array([finish_code(r[2]) for r in rows], np.int8), stop_token=np.zeros(len(rows), np.bool_),
            details={int(k): v for k, v in details.items()}).encode())


def scenario(tmp_path, tokenizer, body, *flags):
    async def run():
        config = NeoConfig.from_args(["--runtime-dir", str(tmp_path / "run"), *flags], env={})
        ctx = zmq.asyncio.Context()
        engine = AsyncEngine(config, tokenizer, "m")
        engine._sock = pair_socket(ctx)
        engine._sock.bind(core_address(str(tmp_path)))
        core_sock = pair_socket(ctx)
        core_sock.connect(core_address(str(tmp_path)))
        engine.status = EngineStatus(ready=True, max_model_len=256, vocab_size=tokenizer.vocab_size,
                                     gpu_blocks_total=16, block_size=16)
        engine.heard_at = time.monotonic()
        reader = asyncio.ensure_future(engine._read())
        try:
            await body(engine, CoreEnd(core_sock))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            engine._sock.close(linger=0)
            core_sock.close(linger=0)
            ctx.term()
            engine.structured.close()

    asyncio.run(run())


async def drain(stream) -> list:
    return [out async for out in stream]


def test_a_stop_string_ends_the_request_here_and_aborts_it_in_the_core(tmp_path, tokenizer):
    ids = tokenizer.encode(" one two three four", add_special_tokens=False)

    async def body(engine: AsyncEngine, core: CoreEnd) -> None:
        stream = engine.submit("r", [1, 2, 3], SamplingParams(max_tokens=10, stop=["three"], temperature=0))
        add = await core.recv()
        assert isinstance(add, AddRequest) and add.prompt_ids.tolist() == [1, 2, 3]
        assert SamplingParams.from_wire(add.params).stop == ["three"]
        reader = asyncio.ensure_future(drain(stream))
        for i, token in enumerate(ids):
            core.send_rows([(add.seq_id, token, None)], {0: {"scheduled": 0.5}} if i == 0 else None)
        outs = await asyncio.wait_for(reader, 5)
        abort = await core.recv()
        assert isinstance(abort, AbortRequests) and abort.seq_ids.tolist() == [add.seq_id]
        assert finish_reason(abort.finish) is FinishReason.STOP
        assert "".join(o.text for o in outs) == " one two " and outs[-1].finish_reason == "stop"
        assert engine.requests == {}, "a finished request must leave the engine"
        core.send_rows([(add.seq_id, ids[-1], None)])   # rows already on their way: ignored
        await asyncio.sleep(0.05)
        assert engine.requests == {}

    scenario(tmp_path, tokenizer, body)


def test_the_cores_failures_and_finishes_reach_each_stream(tmp_path, tokenizer):
    async def body(engine: AsyncEngine, core: CoreEnd) -> None:
        a = engine.submit("a", [5], SamplingParams(max_tokens=2, logprobs=1))
        b = engine.submit("b", [6], SamplingParams(max_tokens=2))
        ids = [(await core.recv()).seq_id for _ in range(2)]
        reads = [asyncio.ensure_future(drain(s)) for s in (a, b)]
        sent_at = time.monotonic()
        core.send_rows([(ids[0], 7, FinishReason.LENGTH), (ids[1], NO_TOKEN, FinishReason.ERROR)],
                       {0: {"logprob": [7, -0.5, 1, [[7, -0.5]]], "cumulative": -0.5},
                        1: {"error": "the GPU worker went away"}})
        out_a, out_b = await asyncio.wait_for(asyncio.gather(*reads), 5)
        assert out_a[-1].finish_reason == "length" and out_a[-1].logprobs[0].logprob == -0.5
        assert out_a[-1].cumulative_logprob == -0.5 and out_a[-1].completion_tokens == 1
        assert out_b[-1].finish_reason == "error" and out_b[-1].error == "the GPU worker went away"
        # token times are the API server's, when it applied the row (vLLM's frontend stamps): TTFT
        # includes any delay between the core and the client
        assert a.req.first_token_time >= sent_at and a.req.last_token_time == a.req.first_token_time
        assert engine.requests == {}

    scenario(tmp_path, tokenizer, body)


def test_capacity_counts_live_requests_and_frees_with_them(tmp_path, tokenizer):
    async def body(engine: AsyncEngine, core: CoreEnd) -> None:
        streams = [engine.submit(str(i), [5], SamplingParams(max_tokens=1)) for i in range(3)]
        with pytest.raises(EngineOverloaded):
            engine.submit("over", [5], SamplingParams(max_tokens=1))
        ids = [(await core.recv()).seq_id for _ in range(3)]
        streams[0].abort()                                  # a client left
        assert isinstance(await core.recv(), AbortRequests)
        core.send_rows([(ids[1], 9, FinishReason.LENGTH)])  # one ended in the core
        await asyncio.wait_for(drain(streams[1]), 5)
        engine.submit("4", [5], SamplingParams(max_tokens=1))
        engine.submit("5", [5], SamplingParams(max_tokens=1))
        assert len(engine.requests) == 3
        failed = engine.fail_requests("the server is shutting down")
        assert failed == 3 and engine.requests == {}
        msgs = [await core.recv() for _ in range(3)]
        aborts = [m for m in msgs if isinstance(m, AbortRequests)]
        assert len(aborts) == 1 and sorted(aborts[0].seq_ids.tolist()) == sorted(
            [ids[2]] + [m.seq_id for m in msgs if isinstance(m, AddRequest)])
        assert finish_reason(aborts[0].finish) is FinishReason.ERROR and RUNNING == -1

    scenario(tmp_path, tokenizer, body, "--max-num-seqs", "2", "--max-waiting", "1")


def test_a_silent_core_is_not_ready_until_it_speaks_again(tmp_path, tokenizer):
    """The core sends a status every second at least; one not heard from for CORE_SILENCE_S is
    wedged (a stopped process, a dead reader): no request is admitted to hang there."""
    async def body(engine: AsyncEngine, core: CoreEnd) -> None:
        assert engine.ready
        engine.heard_at -= CORE_SILENCE_S + 1
        assert not engine.ready and engine.core_silent_s > CORE_SILENCE_S
        core.sock.send(EngineStatus(ready=True, max_model_len=256).encode())
        for _ in range(100):
            if engine.ready:
                break
            await asyncio.sleep(0.01)
        assert engine.ready and engine.core_silent_s < 1

    scenario(tmp_path, tokenizer, body)
