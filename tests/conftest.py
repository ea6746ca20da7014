"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

# Without a GPU, Triton kernels run in Triton's interpreter: the same kernel source executed on the
# CPU, so the kernel tests check the code the GPU runs. It must be set before any kernel is defined.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support.replica import SMALL_POOL_BLOCKS, SMALL_POOL_MAX_LEN, Replica


@pytest.fixture(scope="session")
def small_pool_replica(tmp_path_factory) -> Iterator[Replica]:
    """`neo serve` on the default model with a 48-block GPU pool and a 512-token context, shared."""
    r = Replica(["--num-gpu-blocks", str(SMALL_POOL_BLOCKS), "--max-model-len", str(SMALL_POOL_MAX_LEN),
                 "--max-num-seqs", "32"], str(tmp_path_factory.mktemp("serve") / "serve.log"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


@pytest.fixture
def replica_factory(tmp_path) -> Iterator:
    started: list[Replica] = []

    def start(*args: str, wait: bool = True) -> Replica:
        r = Replica(list(args), str(tmp_path / f"serve-{len(started)}.log"))
        started.append(r)
        if wait:
            r.wait_ready()
        return r

    yield start
    for r in started:
        r.stop()
