"""Accuracy of a classifier on a labeled pool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from curate.device import pick_device
from curate.errors import UserError
from curate.pools import open_pool
from curate.teachers import load_teacher, read_meta_file
from train.data import labeled_batches, make_loader


@torch.inference_mode()
def predictions(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, true label) for every sample of ``loader``, on the CPU."""
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    preds, labels = [], []
    for batch in labeled_batches(loader):
        logits = model(normalize(batch.images.to(device, non_blocking=True)))
        preds.append(logits.argmax(1).cpu())
        labels.append(batch.labels)
    if was_training:
        model.train()
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
             normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> float:
    """Top-1 accuracy (a fraction) over every batch of ``loader``."""
    preds, labels = predictions(model, loader, normalize, device)
    return float((preds == labels).float().mean()) if len(labels) else 0.0


def evaluate_model(path: Path, dataset: str, root: Path | None, meta_file: Path | None, trust_pickle: bool,
                   batch_size: int, workers: int, device_name: str) -> dict:
    """Load any teacher/student file and measure its accuracy, overall and per class, on a labeled pool."""
    device = pick_device(device_name)
    loaded = load_teacher(path, trust_pickle=trust_pickle, meta_overrides=read_meta_file(meta_file), device=device)
    pool = open_pool(dataset, root)
    if pool.class_names and len(pool.class_names) != loaded.num_classes:
        raise UserError(f"{path.name} predicts {loaded.num_classes} classes but {dataset} has "
                        f"{len(pool.class_names)}: evaluate on the dataset the model was trained for")
    loader = make_loader(pool, loaded.spec, batch_size, shuffle=False, seed=0, workers=workers)
    preds, labels = predictions(loaded, loader, loaded.spec.normalize(), device)
    per_class = {}
    for index, name in enumerate(loaded.class_names):
        mask = labels == index
        per_class[name] = (float((preds[mask] == index).float().mean()) if mask.any() else float("nan"), int(mask.sum()))
    return {"accuracy": float((preds == labels).float().mean()), "samples": len(labels), "per_class": per_class}
