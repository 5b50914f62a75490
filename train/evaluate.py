"""Accuracy of a classifier on a labeled pool."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from train.data import labeled_batches


@torch.inference_mode()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
             normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> float:
    """Top-1 accuracy (fraction) over every batch of ``loader``."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval") and was_training:
        model.eval()
    correct = total = 0
    for batch in labeled_batches(loader):
        logits = model(normalize(batch.images.to(device, non_blocking=True)))
        correct += int((logits.argmax(1).cpu() == batch.labels).sum())
        total += len(batch.labels)
    if was_training:
        model.train()
    return correct / max(total, 1)
