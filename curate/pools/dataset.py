"""A pool as a torch Dataset in a model's input spec, with unreadable samples reported instead of raised:
sample by sample (``PoolDataset``) or a batch of positions at once (``read_batch``, ``BatchedPoolDataset``),
which reads runs of fixed-size records in one call and builds no per-sample tensor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from curate.pools.base import Pool, SampleError, uid_of


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

    def pin_memory(self) -> PoolBatch:
        """Called by a DataLoader with ``pin_memory=True``: page-locked images copy to a GPU asynchronously."""
        return dataclasses.replace(self, images=self.images.pin_memory())


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


def collate_samples(items: list[PoolItem],
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PoolBatch:
    """Items into a batch; ``transform`` (``Geometry``), when given, applied to the raw images once per group of
    one shape instead of once per image: torchvision's transforms cost tens of microseconds a call, as much
    as decoding a small PNG."""
    good = [item for item in items if item.image is not None]
    return PoolBatch(
        indices=torch.tensor([item.index for item in good], dtype=torch.int64),
        images=_stack(good, transform) if good else torch.empty(0),
        labels=torch.tensor([item.label for item in good], dtype=torch.int64),
        uids=[item.uid for item in good],
        sources=[item.source for item in good],
        keys=[item.key for item in good],
        errors=[(item.index, item.uid, item.error) for item in items if item.image is None],
    )


def _stack(items: list[PoolItem], transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    if transform is None:
        return torch.stack([item.image for item in items])
    groups: dict[tuple[int, ...], list[int]] = {}
    for number, item in enumerate(items):
        groups.setdefault(tuple(item.image.shape), []).append(number)
    out = None
    for numbers in groups.values():
        converted = transform(torch.stack([items[n].image for n in numbers]))
        if out is None:
            out = torch.empty((len(items), *converted.shape[1:]), dtype=converted.dtype)
        out[torch.tensor(numbers)] = converted
    return out


def read_batch(pool: Pool, positions: Sequence[int], transform: Callable[[torch.Tensor], torch.Tensor]) -> PoolBatch:
    """The samples at ``positions`` collated in that order, ``transform`` applied to the batch (``Geometry``).

    Each part of the pool (itself, or the sources of a mix) that can read many records at once
    (:meth:`Pool.read_many`) is read so; the others sample by sample, errors reported as by ``PoolDataset``.
    """
    positions = np.asarray(positions, dtype=np.int64)
    pieces, order = [], []
    for part, local, where in pool.parts(positions):
        bulk = part.read_many(local)
        if bulk is None:
            dataset = PoolDataset(part, indices=local)  # raw images: the transform runs per shape group
            items = [dataset[k]._replace(index=int(positions[w])) for k, w in enumerate(where)]
            pieces.append(collate_samples(items, transform))
            order.append(where[[item.image is not None for item in items]])
            continue
        images, labels = bulk
        batch = torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))
        keys = part.keys(local)
        pieces.append(PoolBatch(torch.from_numpy(positions[where]), transform(batch.contiguous()),
                                torch.from_numpy(labels.astype(np.int64, copy=False)),
                                [uid_of(part.source, key) for key in keys], [part.source] * len(keys), keys, []))
        order.append(where)
    if len(pieces) == 1 and np.array_equal(order[0], np.arange(len(order[0]))):
        return pieces[0]
    return _in_order(pieces, np.argsort(np.concatenate(order), kind="stable"))


def _in_order(pieces: list[PoolBatch], order: np.ndarray) -> PoolBatch:
    """Pieces read part by part, concatenated and put back in the order their positions were asked in."""
    images = [p.images for p in pieces if len(p.indices)]
    pick = torch.from_numpy(order)

    def reorder(values: list[str]) -> list[str]:
        return [values[i] for i in order]

    return PoolBatch(
        indices=torch.cat([p.indices for p in pieces])[pick],
        images=torch.cat(images)[pick] if images else torch.empty(0),
        labels=torch.cat([p.labels for p in pieces])[pick],
        uids=reorder([u for p in pieces for u in p.uids]),
        sources=reorder([s for p in pieces for s in p.sources]),
        keys=reorder([k for p in pieces for k in p.keys]),
        errors=[e for p in pieces for e in p.errors],
    )


class BatchedPoolDataset(Dataset):
    """``dataset[positions]`` -> the :class:`PoolBatch` of those positions. Give a DataLoader a batch sampler as
    its ``sampler`` with ``batch_size=None``: each worker then reads and transforms whole batches."""

    def __init__(self, pool: Pool, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.pool = pool
        self.transform = transform

    def __getitem__(self, positions: Sequence[int]) -> PoolBatch:
        return read_batch(self.pool, positions, self.transform)


def as_is(batch: PoolBatch) -> PoolBatch:
    """The DataLoader's collate function for :class:`BatchedPoolDataset`: batches arrive collated."""
    return batch
