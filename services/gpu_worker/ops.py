"""The decoder's fused operations, each with its Triton kernel and its torch twin.

On a CUDA device with Triton enabled (``--kernels auto``, the default) the kernels in
``neo_gpu_worker.kernels`` run; everywhere else (the CPU device, ``--kernels torch``) the torch twins
below do. The twins are the reference: the kernels must agree with them, and they are what CI runs.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

from neo_gpu_worker.kernels import triton_available

log = logging.getLogger(__name__)


class _Choice:
    """Which implementation CUDA tensors get. ``triton`` is set once per process by ``configure``
    (the worker serves one model on one device); CPU tensors always take the twins."""

    triton = False


def configure(kernels: str, device: torch.device) -> bool:
    """``auto``: Triton on CUDA when it imports; ``torch``: the twins everywhere. Returns the choice."""
    _Choice.triton = kernels == "auto" and device.type == "cuda" and triton_available()
    if kernels == "auto" and device.type == "cuda" and not _Choice.triton:
        log.warning("Triton is not importable: running the torch twins (slower decode, no CUDA graphs)")
    return _Choice.triton


def use_triton(x: torch.Tensor) -> bool:
    return _Choice.triton and x.is_cuda


def kernels_for(device: torch.device, graphs: bool = False) -> str:
    """The name of the implementation ``device`` runs (cost tables are keyed by it); ``+graphs``
    when its GPU work replays from CUDA graphs (then no launch cost is paid per kernel)."""
    name = "triton" if _Choice.triton and device.type == "cuda" else "torch"
    return name + "+graphs" if graphs and name == "triton" else name


def uses_graphs(device: torch.device, enforce_eager: bool) -> bool:
    """Whether the worker captures CUDA graphs: it needs kernels that never read the device from
    the host (the Triton ones), and ``--enforce-eager`` off."""
    return kernels_for(device) == "triton" and not enforce_eager


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(norm(x), None)``; with ``residual``: ``s = residual + x`` and ``(norm(s), s)``."""
    if use_triton(x):
        from neo_gpu_worker.kernels import elementwise

        return elementwise.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = residual + x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), (x if residual is not None else None)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` of ``[T, 2I]`` laid out ``[gate | up]``."""
    if use_triton(gate_up):
        from neo_gpu_worker.kernels import elementwise

        return elementwise.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU's ``gelu_tanh(gate) * up`` of ``[T, 2I]`` laid out ``[gate | up]`` (Gemma). Plain torch
    on every device: it is CUDA-graph safe, and Gemma's MLP is not on the paths timed for Llama."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                softcap: float) -> torch.Tensor:
    """Attention with ``softcap * tanh(score / softcap)`` on the scaled scores (SDPA has no such
    argument): q ``[B, Hq, n, D]``, k/v ``[B, Hk, L, D]``, mask broadcastable to ``[B, Hq, n, L]``."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in HF's rotate-half layout over tables ``[max_pos, D]`` (fp32). The kernel rotates q and
    k in place (they are views of the fused QKV output); the twin returns rotated copies. With
    ``store = (kv_layer, slot_mapping, v)`` the rotated k and v are also written to their slots
    (``write_kv``): on CUDA in the same kernel, which spares a decode step two launches per layer."""
    if use_triton(q):
        from neo_gpu_worker.kernels import elementwise

        if store is not None:
            return elementwise.rope_and_store_(q, k, store[2], positions, cos, sin, store[0], store[1])
        return elementwise.rope_(q, positions, cos, sin), elementwise.rope_(k, positions, cos, sin)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    if store is not None:
        write_kv(store[0], store[1], k, store[2])
    return q, k


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this iteration's k/v ([T, kv_heads, D]) into their slots. kv_layer: [2, blocks, bs, H, D]."""
    heads, dim = k.shape[1], k.shape[2]
    kv_layer[0].view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
    kv_layer[1].view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: torch.Tensor, max_len: int | None = None,
                     softcap: float = 0.0, gather: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One query token per row against its paged context: q ``[B, Hq, D]`` -> out ``[B, Hq, D]``;
    caches ``[blocks, block_size, Hkv, D]``, block_tables ``[B, W]``, seq_lens ``[B]`` (int32).
    ``max_len`` (the longest context, if the caller knows it) spares the twin a device read.
    ``softcap`` > 0 caps the scaled scores at ``softcap * tanh(s / softcap)`` (Gemma-2).
    ``gather``: the twin's ``decode_gather`` of these tables, when the caller keeps it for every layer."""
    if use_triton(q):
        from neo_gpu_worker.kernels import decode_attention as kernel

        if kernel.supported(q.shape[-1]):
            return kernel.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out,
                                           softcap=softcap)
    heads, dim, bs = k_cache.shape[2], k_cache.shape[3], k_cache.shape[1]
    slots, mask = gather if gather is not None else decode_gather(block_tables, seq_lens, bs, max_len)
    k = k_cache.reshape(-1, heads, dim)[slots].to(q.dtype).transpose(1, 2)     # [B, Hk, S, D]
    v = v_cache.reshape(-1, heads, dim)[slots].to(q.dtype).transpose(1, 2)
    if softcap:
        o = _softcapped(q.unsqueeze(2), k, v, mask[:, None, None, :], scale, softcap)
    else:
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                           enable_gqa=True)
    out.copy_(o.squeeze(2))
    return out


def decode_gather(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode twin's gather: each row's KV slots ``[B, S]`` up to the longest context (0 past its
    own end) and which of them are in its context (``[B, S]``, bool). The same for every layer."""
    width = int(seq_lens.max()) if max_len is None else max_len
    j = torch.arange(width, device=block_tables.device)
    mask = j[None, :] < seq_lens[:, None].long()
    blocks = block_tables.long()[:, j // block_size].clamp_min(0)
    return torch.where(mask, blocks * block_size + j % block_size, 0), mask


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int, scale: float,
                      softcap: float = 0.0) -> torch.Tensor:
    """One prompt chunk: q ``[n, Hq, D]`` at positions ``ctx_start..``, its whole context k/v
    ``[ctx_start + n, Hkv, D]``; causal. The twin of ``varlen_prefill``, one span at a time; the
    only prefill path for a soft-capped model (FlashAttention's varlen entry has no soft-cap)."""
    qp = q.transpose(0, 1).unsqueeze(0)                                  # [1, Hq, n, D]
    kp = k.to(q.dtype).transpose(0, 1).unsqueeze(0)                      # [1, Hk, L, D]
    vp = v.to(q.dtype).transpose(0, 1).unsqueeze(0)
    if softcap:
        length = k.shape[0]
        q_pos = torch.arange(ctx_start, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        op = _softcapped(qp, kp, vp, mask, scale, softcap)
    elif ctx_start == 0:
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    else:
        length = k.shape[0]
        q_pos = torch.arange(ctx_start, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
    return op.squeeze(0).transpose(0, 1)


@functools.cache
def _varlen():
    """torch's FlashAttention varlen entry point and how this torch spells causality, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        causal["enable_gqa"] = True
    return varlen_attn, causal, "scale" in params


def use_varlen(q: torch.Tensor) -> bool:
    return use_triton(q) and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and _varlen() is not None


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Every prefill span in one FlashAttention call over packed tokens: q ``[Tq, Hq, D]``, k/v
    ``[Tk, Hkv, D]`` (each span's whole context), causal aligned to each span's end (a later chunk
    sees its earlier context)."""
    fn, causal, has_scale = _varlen()
    if "enable_gqa" not in causal and k.shape[1] != q.shape[1]:  # older torch: heads must match
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if has_scale:
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **causal)
    return fn(q * (scale * q.shape[-1] ** 0.5), k, v, cu_q, cu_k, max_q, max_k, **causal)
