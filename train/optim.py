"""Optimisers, the learning-rate schedule and mixed precision, for `train teacher` and `train distill`."""

from __future__ import annotations

import math

import torch

from curate.device import fast_bf16

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float | None,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov, default lr 0.05) or AdamW (default lr 2e-3); no weight decay on BatchNorm and biases."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr or 0.05, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr or 2e-3)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mixed_precision(amp: bool | None, device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """(autocast on, its dtype, the gradient scaler): bf16 where the device has it, else fp16 with a scaler
    (bf16 needs none); ``amp`` None turns autocast on where bf16 is fast (``fast_bf16``)."""
    enabled = fast_bf16(device) if amp is None else amp
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return enabled, dtype, torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16)
