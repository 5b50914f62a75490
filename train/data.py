"""Labeled pools as batches for supervised training and evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from curate.errors import UserError
from curate.pools import Pool, PoolBatch, PoolDataset, collate_samples, reader_options
from curate.spec import InputSpec


def make_loader(pool: Pool, spec: InputSpec, batch_size: int, shuffle: bool, seed: int, workers: int,
                indices: np.ndarray | None = None, drop_last: bool = False) -> DataLoader:
    """Batches of uint8 images already in ``spec``'s shape; normalisation and augmentation happen per batch."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        PoolDataset(pool, spec.geometry(), indices),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_samples,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        **reader_options(workers),
    )


def labeled_batches(loader: DataLoader) -> Iterator[PoolBatch]:
    """The loader's batches, refusing samples without labels (a training or test set needs them all)."""
    for batch in loader:
        if batch.errors:
            index, uid, reason = batch.errors[0]
            raise UserError(f"sample {uid} cannot be read ({reason}): fix or remove it from the labeled dataset")
        if len(batch.labels) and int(batch.labels.min()) < 0:
            raise UserError("the dataset has samples without labels: train on a labeled pool such as fashion-mnist")
        yield batch


def infer_input_spec(pool: Pool, in_channels: int | None, image_size: int | None, seed: int,
                     stats_samples: int = 5000) -> InputSpec:
    """Channels and size from the first sample (unless given); per-channel mean/std from a seeded subset."""
    first = pool.sample(0).image
    channels = in_channels or int(first.shape[0])
    size = image_size or int(first.shape[1])
    geometry = InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels).geometry()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(stats_samples, len(pool)), replace=False)
    pixels = torch.stack([geometry(pool.sample(int(i)).image) for i in picks]).float().div_(255)
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return InputSpec(channels, size, tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))


def class_names_of(pool: Pool, num_classes: int | None) -> list[str]:
    """The pool's class names, or numbered classes when it has none (then ``num_classes`` is required)."""
    if pool.class_names:
        if num_classes is not None and num_classes != len(pool.class_names):
            raise UserError(f"--num-classes {num_classes} disagrees with the dataset's {len(pool.class_names)} classes")
        return list(pool.class_names)
    if num_classes is None:
        raise UserError(f"{pool.source} does not name its classes: pass --num-classes")
    return [str(i) for i in range(num_classes)]
