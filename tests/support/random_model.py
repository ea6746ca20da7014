"""Hugging Face folders of small models with random weights, for tests that need a real checkpoint."""

from __future__ import annotations

import os


def random_hf_folder(parent: str, config) -> str:
    """Save a ``transformers`` model of ``config`` with seeded random weights under ``parent``.

    Weights are larger than the init default (logits far from uniform, like a trained model's), norm
    weights non-unit (a norm applied to the wrong tensor shows), biases non-zero.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.08)
    folder = os.path.join(str(parent), config.model_type)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
