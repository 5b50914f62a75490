"""A pool as a torch Dataset in a model's input spec, with unreadable samples reported instead of raised."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


class PoolItem(NamedTuple):
    """One sample as the dataset hands it over; an unreadable one has no image and says why in ``error``."""

    index: int  # pool position
    uid: str
    source: str
    key: str
    image: torch.Tensor | None
    label: int  # -1 where the source has no label
    error: str | None = None


class PoolDataset(Dataset):
    """``dataset[i]`` -> the :class:`PoolItem` of position ``i`` (of ``indices[i]`` when given)."""

    def __init__(self, pool: Pool, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: Sequence[int] | None = None) -> None:
        self.pool = pool
        self.transform = transform
        self.indices = indices

    def __len__(self) -> int:
        return len(self.pool) if self.indices is None else len(self.indices)

    def __getitem__(self, position: int) -> PoolItem:
        index = position if self.indices is None else int(self.indices[position])
        try:
            sample = self.pool.sample(index)
        except SampleError as err:
            return PoolItem(index, self.pool.uid(index), "", "", None, -1, str(err))
        image = self.transform(sample.image) if self.transform is not None else sample.image
        return PoolItem(index, sample.uid, sample.source, sample.key, image,
                        -1 if sample.label is None else sample.label)


def collate_samples(items: list[PoolItem]) -> PoolBatch:
    good = [item for item in items if item.image is not None]
    return PoolBatch(
        indices=torch.tensor([item.index for item in good], dtype=torch.int64),
        images=torch.stack([item.image for item in good]) if good else torch.empty(0),
        labels=torch.tensor([item.label for item in good], dtype=torch.int64),
        uids=[item.uid for item in good],
        sources=[item.source for item in good],
        keys=[item.key for item in good],
        errors=[(item.index, item.uid, item.error) for item in items if item.image is None],
    )
