"""A pool as a torch Dataset in a model's input spec, with unreadable samples reported instead of raised."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from curate.pools.base import Pool, SampleError


@dataclass
class PoolBatch:
    """A collated batch: the readable samples, and (index, uid, reason) for the ones that were not."""

    indices: torch.Tensor  # int64, pool positions of the rows in ``images``
    images: torch.Tensor
    labels: torch.Tensor  # int64, -1 where the source has no label
    uids: list[str]
    sources: list[str]
    keys: list[str]
    errors: list[tuple[int, str, str]]


class PoolDataset(Dataset):
    """``dataset[i]`` -> (i, uid, source, key, image, label), or (i, uid, "", "", None, reason) for an
    unreadable sample."""

    def __init__(self, pool: Pool, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: Sequence[int] | None = None) -> None:
        self.pool = pool
        self.transform = transform
        self.indices = indices

    def __len__(self) -> int:
        return len(self.pool) if self.indices is None else len(self.indices)

    def __getitem__(self, position: int) -> tuple:
        index = position if self.indices is None else int(self.indices[position])
        try:
            sample = self.pool.sample(index)
        except SampleError as err:
            return index, self.pool.uid(index), "", "", None, str(err)
        image = self.transform(sample.image) if self.transform is not None else sample.image
        return index, sample.uid, sample.source, sample.key, image, -1 if sample.label is None else sample.label


def collate_samples(items: list[tuple]) -> PoolBatch:
    good = [item for item in items if item[4] is not None]
    errors = [(item[0], item[1], item[5]) for item in items if item[4] is None]
    if good:
        images = torch.stack([item[4] for item in good])
    else:
        images = torch.empty(0)
    return PoolBatch(
        indices=torch.tensor([item[0] for item in good], dtype=torch.int64),
        images=images,
        labels=torch.tensor([item[5] for item in good], dtype=torch.int64),
        uids=[item[1] for item in good],
        sources=[item[2] for item in good],
        keys=[item[3] for item in good],
        errors=errors,
    )
