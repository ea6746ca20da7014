"""The engine loop outlives a bug in one iteration: that iteration's requests fail, later ones run."""

from __future__ import annotations

import asyncio

import numpy as np
import zmq.asyncio

from neo_common.config import NeoConfig
from neo_common.geometry import GEOMETRIES
from neo_common.model_source import embedded_gguf_path
from neo_common.protocol import IterationResult, WorkerReady
from neo_gateway.engine import Engine
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import SchedulerOutput
from neo_gateway.tokenizer import TextTokenizer


def test_a_failing_iteration_fails_its_requests_and_the_loop_goes_on(tmp_path):
    tokenizer = TextTokenizer.from_gguf(embedded_gguf_path())

    async def scenario() -> tuple[list, list]:
        ctx = zmq.asyncio.Context()
        config = NeoConfig.from_args(["--runtime-dir", str(tmp_path / "run")], env={})
        engine = Engine(config, tokenizer, ctx, "m")
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
            async def collect(rid: str) -> list:
                return [o async for o in engine.submit(rid, [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))]

            first = await asyncio.wait_for(collect("a"), 10)  # a dead loop would never answer
            second = await asyncio.wait_for(collect("b"), 10)
            assert engine.loop_alive and engine.ready
            engine._loop_task.cancel()
            await asyncio.gather(engine._loop_task, return_exceptions=True)
            assert not engine.loop_alive and not engine.ready, "/health and /ready must see a dead loop"
            return first, second
        finally:
            SchedulerOutput.to_plan = real_to_plan
            ctx.destroy(linger=0)

    first, second = asyncio.run(scenario())
    assert first[-1].finished and first[-1].error and "simulated bug" in first[-1].error
    assert second[-1].finished and second[-1].error is None and second[-1].finish_reason == "stop"
