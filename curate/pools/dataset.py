"""A pool as a torch Dataset in a model's input spec, with unreadable samples reported instead of raised:
sample by sample (``PoolDataset``) or a batch of positions at once (``read_batch``, ``BatchedPoolDataset``),
which reads runs of fixed-size records in one call and builds no per-sample tensor."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from curate.device import to_device
from curate.pools.base import Pool, SampleError, to_chw_uint8, uid_of
from curate.pools.images import EncodedImagePool
from curate.pools.jpeg_on_device import EncodedJpeg, decode_jpegs, for_the_device
from curate.spec import Geometry


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
    # rows handed over as JPEG bytes, to be decoded where the teacher runs; ``images`` then holds the other
    # rows, in row order
    jpegs: list[EncodedJpeg] = field(default_factory=list)

    def pin_memory(self) -> PoolBatch:
        """Called by a DataLoader with ``pin_memory=True``: page-locked images copy to a GPU asynchronously."""
        return dataclasses.replace(self, images=self.images.pin_memory())

    def on_device(self, device: torch.device, geometry: Geometry) -> PoolBatch:
        """The batch with every image on ``device`` in ``geometry``: JPEGs still encoded are decoded there; one
        that no decoder reads leaves the batch for its errors."""
        images = self.images.to(device, non_blocking=True)
        if not self.jpegs:
            return dataclasses.replace(self, images=images)
        decoded, failures = decode_jpegs(self.jpegs, geometry, device)
        rows = len(self.indices)
        encoded = {jpeg.row for jpeg in self.jpegs}
        failed = {number for number, _ in failures}
        full = torch.empty((rows, *geometry.shape), dtype=torch.uint8, device=device)
        for where, values in (([row for row in range(rows) if row not in encoded], images),
                              ([jpeg.row for number, jpeg in enumerate(self.jpegs) if number not in failed], decoded)):
            if where:
                full[to_device(torch.tensor(where, dtype=torch.int64), device)] = values
        if not failures:
            return dataclasses.replace(self, images=full, jpegs=[])
        lost = {self.jpegs[number].row: reason for number, reason in failures}
        keep = [row for row in range(rows) if row not in lost]
        errors = [(int(self.indices[row]), self.uids[row], reason) for row, reason in lost.items()]
        return PoolBatch(self.indices[keep], full[torch.tensor(keep, device=device)], self.labels[keep],
                         [self.uids[row] for row in keep], [self.sources[row] for row in keep],
                         [self.keys[row] for row in keep], self.errors + errors)


class PoolItem(NamedTuple):
    """One sample as the dataset hands it over; an unreadable one has no image and says why in ``error``."""

    index: int  # pool position
    uid: str
    source: str
    key: str
    image: torch.Tensor | EncodedJpeg | None  # a JPEG left encoded (see ``read_batch``), its row set at collation
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
    decoded = [item for item in good if isinstance(item.image, torch.Tensor)]
    return PoolBatch(
        indices=torch.tensor([item.index for item in good], dtype=torch.int64),
        images=_stack(decoded, transform) if decoded else torch.empty(0),
        labels=torch.tensor([item.label for item in good], dtype=torch.int64),
        uids=[item.uid for item in good],
        sources=[item.source for item in good],
        keys=[item.key for item in good],
        errors=[(item.index, item.uid, item.error) for item in items if item.image is None],
        jpegs=[dataclasses.replace(item.image, row=row) for row, item in enumerate(good)
               if isinstance(item.image, EncodedJpeg)],
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


def read_batch(pool: Pool, positions: Sequence[int], transform: Callable[[torch.Tensor], torch.Tensor],
               jpegs_encoded: bool = False) -> PoolBatch:
    """The samples at ``positions`` collated in that order, ``transform`` applied to the batch (``Geometry``).

    Each part of the pool (itself, or the sources of a mix) that can read many records at once
    (:meth:`Pool.read_many`) is read so; the others sample by sample, errors reported as by ``PoolDataset``.
    With ``jpegs_encoded``, JPEGs of encoded-image pools stay bytes for the device to decode
    (``PoolBatch.on_device``).
    """
    positions = np.asarray(positions, dtype=np.int64)
    pieces, order = [], []
    for part, local, where in pool.parts(positions):
        bulk = part.read_many(local)
        if bulk is None:
            if jpegs_encoded and isinstance(part, EncodedImagePool):
                items = [_keeping_jpeg(part, int(local[k]), int(positions[w])) for k, w in enumerate(where)]
            else:
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


def _keeping_jpeg(pool: EncodedImagePool, index: int, position: int) -> PoolItem:
    """Sample ``index`` as ``PoolDataset`` gives it, except that a JPEG stays encoded."""
    key = pool.key(index)
    try:
        data, label = pool.read_encoded(index)
        image = EncodedJpeg(-1, torch.frombuffer(bytearray(data), dtype=torch.uint8), pool.decode, key) \
            if for_the_device(data) else to_chw_uint8(pool.decode(data, key))
    except SampleError as err:
        return PoolItem(position, pool.uid(index), "", "", None, -1, str(err))
    return PoolItem(position, uid_of(pool.source, key), pool.source, key, image, -1 if label is None else label)


def _in_order(pieces: list[PoolBatch], order: np.ndarray) -> PoolBatch:
    """Pieces read part by part, concatenated and put back in the order their positions were asked in."""
    pick = torch.from_numpy(order)
    goes_to = np.empty_like(order)  # row of the concatenation -> row of the batch
    goes_to[order] = np.arange(len(order))
    jpegs, decoded_rows, offset = [], [], 0
    for piece in pieces:
        encoded = {jpeg.row for jpeg in piece.jpegs}
        jpegs += [dataclasses.replace(jpeg, row=int(goes_to[offset + jpeg.row])) for jpeg in piece.jpegs]
        decoded_rows += [goes_to[offset + row] for row in range(len(piece.indices)) if row not in encoded]
        offset += len(piece.indices)
    images = [p.images for p in pieces if len(p.images)]

    def reorder(values: list[str]) -> list[str]:
        return [values[i] for i in order]

    return PoolBatch(
        indices=torch.cat([p.indices for p in pieces])[pick],
        images=torch.cat(images)[torch.from_numpy(np.argsort(decoded_rows))] if images else torch.empty(0),
        labels=torch.cat([p.labels for p in pieces])[pick],
        uids=reorder([u for p in pieces for u in p.uids]),
        sources=reorder([s for p in pieces for s in p.sources]),
        keys=reorder([k for p in pieces for k in p.keys]),
        errors=[e for p in pieces for e in p.errors],
        jpegs=jpegs,
    )


class BatchedPoolDataset(Dataset):
    """``dataset[positions]`` -> the :class:`PoolBatch` of those positions. Give a DataLoader a batch sampler as
    its ``sampler`` with ``batch_size=None``: each worker then reads and transforms whole batches."""

    def __init__(self, pool: Pool, transform: Callable[[torch.Tensor], torch.Tensor],
                 jpegs_encoded: bool = False) -> None:
        self.pool = pool
        self.transform = transform
        self.jpegs_encoded = jpegs_encoded

    def __getitem__(self, positions: Sequence[int]) -> PoolBatch:
        return read_batch(self.pool, positions, self.transform, self.jpegs_encoded)


def as_is(batch: PoolBatch) -> PoolBatch:
    """The DataLoader's collate function for :class:`BatchedPoolDataset`: batches arrive collated."""
    return batch


def reader_options(workers: int) -> dict[str, Any]:
    """The DataLoader options of ``workers`` processes reading a pool (none: it reads in this process), four
    batches ahead each.

    They fork from a fork server, a fresh process that imported torch and the pools once, not from the caller: a
    fork copies the caller as its other threads left it (rich's refresh thread, the teacher's OpenMP pool, Arrow's
    and DuckDB's threads), and a reader forked from a long-lived process that had scored, selected and exported
    before died now and then of a segmentation fault. The pool reaches the workers pickled, as it reaches Ray's.
    """
    if workers <= 0:
        return {"num_workers": 0}
    context = multiprocessing.get_context("forkserver")
    # Imported once by the server, so a worker starts in milliseconds; without "__main__" each worker would
    # import the calling script again. The server itself costs one import of torch (~4 s on 2 cores), once per
    # process.
    context.set_forkserver_preload(["__main__", "torch", "curate.pools"])
    return {"num_workers": workers, "prefetch_factor": 4, "multiprocessing_context": context}


def reader_workers(requested: int | None, pool: Pool) -> int:
    """DataLoader workers reading ``pool``: ``requested``, else none where reading costs microseconds a sample
    (array pools: a batch's trip between processes costs more than reading it) and one per core elsewhere."""
    if requested is not None:
        return requested
    return 0 if pool.cheap_to_read else os.cpu_count() or 1
