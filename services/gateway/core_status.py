"""The engine core's state as the API server sees it: one ``EngineStatus`` snapshot, read from the
scheduler, its pools and the worker links in the core's own process (the metrics never reach in)."""

from __future__ import annotations

from neo_common.engine_core_protocol import EngineStatus


def engine_status(core, request_id: int = 0) -> EngineStatus:
    """``core``: the ``engine_core.EngineCore`` (not imported: it imports this module)."""
    ready = core.link.ready
    status = EngineStatus(request_id=request_id, ready=core.ready, loop_alive=core.loop_alive,
                          max_model_len=core.max_model_len, worker_up=core.link.alive,
                          cpu_attention_up=bool(core.cpu_links) and all(link.alive for link in core.cpu_links),
                          workers=[[link.name, link.ready.pid if link.alive and link.ready else 0]
                                   for link in core.links],
                          link_rejections={link.name: {str(getattr(reason, "value", reason)): count
                                                       for reason, count in sorted(link.rejected.items())}
                                           for link in core.links})
    if ready is not None:
        status.worker_device, status.worker_dtype, status.worker_kv_dtype = ready.device, ready.dtype, ready.kv_dtype
        if ready.geometry is not None:
            status.vocab_size, status.num_layers = ready.geometry.vocab_size, ready.geometry.num_layers
            status.eos_token_ids = list(core.eos_token_ids)
    sched = core.scheduler
    if sched is None:
        return status
    gpu, cpu, host = sched.gpu, sched.cpu, sched.host
    status.block_size, status.gpu_blocks_total, status.gpu_blocks_free = gpu.block_size, gpu.num_blocks, gpu.num_free
    status.gpu_usage = gpu.usage
    status.num_running, status.num_waiting = sched.num_running, sched.num_waiting
    status.decoding_gpu, status.decoding_cpu = len(sched.running), len(sched.cpu_queue)
    status.num_preemptions = sched.num_preemptions
    status.swapped_out, status.swapped_in = sched.num_swapped_out, sched.num_swapped_in
    status.prefix_queried_tokens, status.prefix_hit_tokens_gpu = gpu.queried_tokens, gpu.hit_tokens
    status.pipeline_overhead_s = sched.calibration.overhead_s
    if cpu is not None:
        status.cpu_blocks_total, status.cpu_usage = cpu.num_blocks, cpu.usage
    if host is not None:
        status.prefix_hit_tokens_host = cpu.hit_tokens
        status.demoted_bytes = host.num_demoted_blocks * host.block_bytes
        status.promoted_bytes = host.num_promoted_blocks * host.block_bytes
        status.host_cached_blocks = len(cpu.evictable)
    return status
