"""Accuracy of a classifier on a labeled pool, and its agreement with a teacher there or on held-out shard rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from curate.device import pick_device
from curate.errors import UserError
from curate.pools import open_pool
from curate.selected import CuratedShards
from curate.spec import InputSpec
from curate.teachers import Flags, Teacher, load_teacher, read_meta_file
from train.data import labeled_batches, make_loader
from train.losses import kd_per_sample
from train.shards import ShardBatches, held_out_pairs, held_out_rows

# Evaluation batches: 128 images keep a small convnet's activations in the CPU's caches. Measured on the 2-core
# machine, fp32, 10,000 28x28 images: a full-width resnet8 teacher 5,700-6,300 img/s at 128 against 2,000-2,400 at
# 1,000, a half-width student 7,000-10,000 against 5,300-6,400. On a GPU the sets evaluated here are small enough
# that the batch size hardly matters.
EVAL_BATCH = 128
MODEL_FLAGS = Flags("--model", "--model-meta", "--trust-pickle")  # how `train eval` names the model's options


@torch.inference_mode()
def predictions(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                normalize: Callable[[torch.Tensor], torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def class_accuracies(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy on each class, in class order (NaN for a class without samples)."""
    return [float((preds[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


class Evaluator:
    """A labeled pool (or a seeded subset of ``limit`` samples), loaded once with the teacher's predictions
    on it; calling it on a model gives accuracy and, with a teacher, agreement with it."""

    def __init__(self, dataset: str, root: Path | None, spec: InputSpec, num_classes: int, teacher: Teacher | None,
                 device: torch.device, limit: int | None = None, batch_size: int = EVAL_BATCH) -> None:
        pool = open_pool(dataset, root)
        first = next(iter(pool), None)
        if first is None or first.label is None:  # checked now, not at the first evaluation
            raise UserError(f"--eval {dataset} has no labels to measure accuracy with: evaluate on a labeled "
                            "pool such as fashion-mnist:test")
        if pool.class_names and len(pool.class_names) != num_classes:
            raise UserError(f"--eval {dataset} has {len(pool.class_names)} classes, the teacher {num_classes}: "
                            "evaluate on the teacher's task")
        indices = None
        if limit is not None and limit < len(pool):
            indices = np.sort(np.random.default_rng(0).choice(len(pool), limit, replace=False))
        self.loader = make_loader(pool, spec, batch_size, shuffle=False, seed=0, workers=0, indices=indices)
        self.num_classes = num_classes
        self.normalize = spec.normalize()
        self.device = device
        self.teacher_preds: torch.Tensor | None = None
        self.teacher_accuracy: float | None = None
        if teacher is not None:
            self.teacher_preds, labels = predictions(teacher.model, self.loader, teacher.spec.normalize(), device)
            self.teacher_accuracy = float((self.teacher_preds == labels).float().mean())

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], per_class: bool = False) -> dict[str, Any]:
        """Accuracy, agreement with the teacher if there is one, and with ``per_class`` the accuracy on each
        class (a list in class order)."""
        preds, labels = predictions(model, self.loader, self.normalize, self.device)
        result: dict[str, Any] = {"accuracy": float((preds == labels).float().mean())}
        if self.teacher_preds is not None:
            result["agreement"] = float((preds == self.teacher_preds).float().mean())
        if per_class:
            result["per_class_accuracy"] = class_accuracies(preds, labels, self.num_classes)
        return result


class HeldOutAgreement:
    """How closely the student matches the teacher on shard rows held out of training (``--holdout``), from their
    stored logits: label-free figures by which recipes can be compared. Agreement of the argmax, and the
    divergence KL(teacher || student) of the full distributions (T = 1), each overall and averaged over the
    teacher's classes, so that a class the pool rarely shows counts as much as a common one. The divergence is
    the one a recipe cannot inflate by training on the teacher's argmax (the hard-label term)."""

    def __init__(self, rows: dict[str, torch.Tensor], normalize: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device, batch_size: int = EVAL_BATCH) -> None:
        self.images = rows["pixels"].split(batch_size)
        self.teacher_logits = rows["logits"].float()
        self.teacher_preds = self.teacher_logits.argmax(1)
        self.normalize, self.device = normalize, device

    @classmethod
    def of(cls, stream: ShardBatches, held_out: np.ndarray | None, normalize: Callable[[torch.Tensor], torch.Tensor],
           device: torch.device) -> HeldOutAgreement | None:
        """The held-out rows of ``stream``'s shards (None: none held out)."""
        if held_out is None:
            return None
        if not held_out.any():
            raise UserError(f"--holdout keeps none of the {len(held_out):,} rows out of training: raise it")
        return cls(stream.rows(*held_out_pairs(stream.shards, held_out)), normalize, device)

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        logits = torch.cat([model(self.normalize(x.to(self.device))).float().cpu() for x in self.images])
        model.train()
        agrees = (logits.argmax(1) == self.teacher_preds).float()
        divergence = kd_per_sample(logits, self.teacher_logits, 1.0)
        classes = self.teacher_preds.unique()

        def class_mean(values: torch.Tensor) -> float:
            return float(torch.stack([values[self.teacher_preds == c].mean() for c in classes]).mean())

        return {"holdout_agreement": float(agrees.mean()), "holdout_class_agreement": class_mean(agrees),
                "holdout_kl": float(divergence.mean()), "holdout_class_kl": class_mean(divergence)}


def evaluate_model(path: Path, dataset: str, root: Path | None, meta_file: Path | None, trust_pickle: bool,
                   batch_size: int, workers: int, device_name: str) -> dict:
    """Load any teacher/student file and measure its accuracy, overall and per class, on a labeled pool."""
    device = pick_device(device_name)
    loaded = load_teacher(path, trust_pickle=trust_pickle, meta_overrides=read_meta_file(meta_file), device=device,
                          flags=MODEL_FLAGS)
    pool = open_pool(dataset, root)
    if pool.class_names and len(pool.class_names) != loaded.num_classes:
        raise UserError(f"{path.name} predicts {loaded.num_classes} classes but {dataset} has "
                        f"{len(pool.class_names)}: evaluate on the dataset the model was trained for")
    loader = make_loader(pool, loaded.spec, batch_size, shuffle=False, seed=0, workers=workers)
    preds, labels = predictions(loaded, loader, loaded.spec.normalize(), device)
    per_class = {name: (correct, int((labels == index).sum())) for index, (name, correct)
                 in enumerate(zip(loaded.class_names, class_accuracies(preds, labels, loaded.num_classes)))}
    return {"accuracy": float((preds == labels).float().mean()), "samples": len(labels), "per_class": per_class}


def held_out_figures(path: Path, folder: Path, fraction: float, meta_file: Path | None, trust_pickle: bool,
                     device_name: str) -> dict[str, float]:
    """How closely a student file matches the teacher on the rows of a curated folder that ``train distill
    --holdout fraction`` keeps out of training (the same rows for any folder of as many rows): the label-free
    figures of the training log, for a student trained on other shards (a refined copy of the folder)."""
    if not 0 < fraction < 1:
        raise UserError(f"--holdout {fraction} is not a fraction of the rows in (0, 1): give the one the student was "
                        "distilled with")
    device = pick_device(device_name)
    shards = CuratedShards.open(folder)
    loaded = load_teacher(path, trust_pickle=trust_pickle, meta_overrides=read_meta_file(meta_file), device=device,
                          flags=MODEL_FLAGS)
    if loaded.num_classes != shards.num_classes or tuple(loaded.spec.shape()) != shards.image_shape:
        raise UserError(f"{path.name} takes {tuple(loaded.spec.shape())} images into {loaded.num_classes} classes, "
                        f"{folder} holds {shards.image_shape} images of {shards.num_classes}: give the folder the "
                        "student was distilled for")
    stream = ShardBatches(shards, plan_for=lambda epoch: [])
    normalize = InputSpec.from_meta(shards.manifest["input_spec"]).normalize()
    return HeldOutAgreement.of(stream, held_out_rows(shards.rows, fraction), normalize, device)(loaded.model)
