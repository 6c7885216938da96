"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer whose LoRA B matrices learn `loraplus_lr_ratio` times faster than everything else.

    The paper (section 3) shows that with equal rates the B side learns too slowly in wide models;
    a ratio of about 16 is its recommendation. `loraplus_lr_embedding` is kept for HF PEFT signature
    compatibility (petune does not put LoRA on embeddings). `optimizer_kwargs` such as `weight_decay`
    go to `optimizer_cls`.
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio}")
    del loraplus_lr_embedding
    fast: list[nn.Parameter] = []
    slow: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (fast if ".lora_B." in f".{name}." or name.endswith("lora_B.weight") else slow).append(param)
    groups = [
        {"params": slow, "lr": lr},
        {"params": fast, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
