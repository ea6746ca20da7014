"""Which torch device and dtype this worker computes on (``--device``, ``--dtype``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: no CUDA device is visible to this process")
        if device.index is None:
            # CUDA_VISIBLE_DEVICES picks the cards; tensor-parallel rank r takes the r-th of them
            if rank >= torch.cuda.device_count():
                raise RuntimeError(f"tensor-parallel rank {rank} needs GPU {rank}, but "
                                   f"{torch.cuda.device_count()} are visible")
            device = torch.device("cuda", rank)
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
