"""The engine core's loop outlives a bug in one iteration: that iteration's requests fail, later ones run."""

from __future__ import annotations

import asyncio

import numpy as np
import zmq.asyncio

from neo_common.config import NeoConfig
from neo_common.engine_core_protocol import NO_TOKEN, AddRequest, EngineCoreOutputs, finish_reason
from neo_common.geometry import GEOMETRIES
from neo_common.model_source import embedded_gguf_path
from neo_common.protocol import IterationResult, WorkerReady
from neo_gateway.engine_core import EngineCore
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import SchedulerOutput
from neo_gateway.tokenizer import TextTokenizer


def test_a_failing_iteration_fails_its_requests_and_the_loop_goes_on(tmp_path):
    tokenizer = TextTokenizer.from_gguf(embedded_gguf_path())

    async def scenario() -> tuple[list, list]:
        ctx = zmq.asyncio.Context()
        config = NeoConfig.from_args(["--runtime-dir", str(tmp_path / "run")], env={})
        sent: list = []
        arrived = asyncio.Event()

        def emit(msg) -> None:   # what the core sends the API server
            if isinstance(msg, EngineCoreOutputs):
                sent.append(msg)
                arrived.set()

        engine = EngineCore(config, tokenizer, ctx, "m", emit)
        engine.link.ready = WorkerReady(num_gpu_blocks=16, block_size=16, max_model_len=256,
                                        geometry=GEOMETRIES["smollm2-135m"])
        calls = {"n": 0}
        real_to_plan = SchedulerOutput.to_plan

        def flaky_to_plan(self, gpu, cpu=None):  # a bug in plan building, the first time only
            calls["n"] += 1
            if calls["n"] == 1:
                raise OverflowError("simulated bug")
            return real_to_plan(self, gpu, cpu)

        replies: list[IterationResult] = []

        async def fake_worker_send(plan, awaits_reply=False):
            """A FAKE worker (it answers EOS for every sampled row): the property under test is the
            gateway loop's, and a real worker adds 20 s of model loading and nothing to it."""
            rows = np.flatnonzero(plan.sample)
            replies.append(IterationResult(iteration_id=plan.iteration_id, seq_ids=plan.seq_ids[rows],
                                           token_ids=np.full(len(rows), 2, np.int32)))

        async def fake_worker_reply(generation, iteration_id):
            return replies.pop(0)

        SchedulerOutput.to_plan = flaky_to_plan
        engine.link.send, engine.link.reply = fake_worker_send, fake_worker_reply
        engine._adopt_worker()
        try:
            engine._loop_task = asyncio.create_task(engine._loop())
            async def collect(seq_id: int) -> list:
                """(token, finish, details) of each row the core sent for this request, to its last."""
                engine.add(AddRequest(seq_id=seq_id, request_id=str(seq_id), prompt_ids=np.array([5, 6, 7], np.int32),
                                      params=SamplingParams(max_tokens=3, temperature=0).to_wire()))
                rows: list = []
                while not rows or finish_reason(rows[-1][1]) is None:
                    arrived.clear()
                    for msg in sent:
                        for i, sid in enumerate(msg.seq_ids.tolist()):
                            if sid == seq_id:
                                rows.append((int(msg.token_ids[i]), int(msg.finish[i]), msg.details.get(i, {})))
                    sent.clear()
                    if not rows or finish_reason(rows[-1][1]) is None:
                        await arrived.wait()
                return rows

            first = await asyncio.wait_for(collect(1), 10)  # a dead loop would never answer
            second = await asyncio.wait_for(collect(2), 10)
            assert engine.loop_alive and engine.ready
            engine._loop_task.cancel()
            await asyncio.gather(engine._loop_task, return_exceptions=True)
            assert not engine.loop_alive and not engine.ready, "/health and /ready must see a dead loop"
            return first, second
        finally:
            SchedulerOutput.to_plan = real_to_plan
            ctx.destroy(linger=0)

    first, second = asyncio.run(scenario())
    token, finish, details = first[-1]
    assert token == NO_TOKEN and finish_reason(finish) == "error" and "simulated bug" in details["error"]
    token, finish, details = second[-1]
    assert token == 2 and finish_reason(finish) == "stop" and "error" not in details


def test_a_worker_lost_while_the_next_plan_is_sent_still_delivers_the_finished_requests_last_rows(tmp_path):
    """The core sends the next plan before it emits the rows of the result it just applied; if the
    worker is gone by then, a request that result finished still gets its last row (and its finish),
    and the one that would have run next fails with the worker's error instead of hanging."""
    from neo_gateway.worker_link import WorkerDown

    tokenizer = TextTokenizer.from_gguf(embedded_gguf_path())

    async def scenario() -> dict:
        ctx = zmq.asyncio.Context()
        config = NeoConfig.from_args(["--runtime-dir", str(tmp_path / "run"), "--async-scheduling", "false"], env={})
        rows: dict = {}
        done = asyncio.Event()

        def emit(msg) -> None:
            if isinstance(msg, EngineCoreOutputs):
                for i, sid in enumerate(msg.seq_ids.tolist()):
                    rows.setdefault(sid, []).append((int(msg.token_ids[i]), finish_reason(int(msg.finish[i]))))
                if all(r and r[-1][1] is not None for r in (rows.get(1), rows.get(2))):
                    done.set()

        engine = EngineCore(config, tokenizer, ctx, "m", emit)
        engine.link.ready = WorkerReady(num_gpu_blocks=16, block_size=16, max_model_len=256,
                                        geometry=GEOMETRIES["smollm2-135m"])
        replies: list[IterationResult] = []

        async def fake_worker_send(plan, awaits_reply=False):
            """A FAKE worker that answers its first plan (token 9 for every sampled row) and is gone
            when the second is sent."""
            if replies or plan.iteration_id > 1:
                raise WorkerDown("the GPU worker went away")
            rows_ = np.flatnonzero(plan.sample)
            replies.append(IterationResult(iteration_id=plan.iteration_id, seq_ids=plan.seq_ids[rows_],
                                           token_ids=np.full(len(rows_), 9, np.int32)))

        async def fake_worker_reply(generation, iteration_id):
            return replies.pop(0)

        engine.link.send, engine.link.reply = fake_worker_send, fake_worker_reply
        engine._adopt_worker()
        try:
            for seq_id, max_tokens in ((1, 1), (2, 5)):   # 1 ends on the first plan's token, 2 goes on
                engine.add(AddRequest(seq_id=seq_id, request_id=str(seq_id), prompt_ids=np.array([5, 6, 7], np.int32),
                                      params=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                            ignore_eos=True).to_wire()))
            engine._loop_task = asyncio.create_task(engine._loop())
            await asyncio.wait_for(done.wait(), 10)
            engine._loop_task.cancel()
            await asyncio.gather(engine._loop_task, return_exceptions=True)
            return rows
        finally:
            ctx.destroy(linger=0)

    rows = asyncio.run(scenario())
    assert rows[1] == [(9, "length")], rows
    assert rows[2][-1][1] == "error", rows
