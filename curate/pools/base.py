"""What every pool is: an ordered, random-access collection of images with stable keys.

A pool is opened in the main process and pickled into DataLoader workers, so
opening must be cheap and nothing heavy may travel with it: file handles,
memory maps and decoded arrays are attributes listed in ``_transient`` and are
rebuilt lazily in each process.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from curate.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One pool item. ``image`` is a uint8 CHW tensor with 1 or 3 channels."""

    uid: str
    source: str
    key: str
    image: torch.Tensor
    label: int | None


class SampleError(Exception):
    """One sample cannot be read (corrupt file, undecodable bytes). Reported and skipped, never fatal."""


class Pool(abc.ABC):
    """Base class of pool kinds.

    Subclasses set ``kind``, ``summary`` and ``options`` (name -> help, shown by
    ``curate pools``), take ``root`` plus those options as keyword arguments,
    and implement ``__len__``, ``key`` and ``read``.
    """

    kind: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[dict[str, str]] = {}
    # options of any kind that count something or give a side in pixels: checked >= 1 at open
    positive_options: ClassVar[frozenset[str]] = frozenset({"count", "size", "max_side", "channels"})
    root_help: ClassVar[str] = "folder holding the dataset's files"
    _transient: ClassVar[tuple[str, ...]] = ()

    # Array-backed pools read a sample in microseconds; decoding files or rendering glyphs takes
    # around a millisecond, which is when DataLoader worker processes pay for themselves.
    cheap_to_read: ClassVar[bool] = True

    source: str
    class_names: list[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._transient}

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def key(self, index: int) -> str:
        """Index or relative path of sample ``index`` inside its source; stable across runs."""

    @abc.abstractmethod
    def read(self, index: int) -> tuple[np.ndarray | torch.Tensor, int | None]:
        """Image (HW, HWC uint8 array or CHW uint8 tensor) and label of sample ``index``.

        Raises :class:`SampleError` when that one sample is unreadable.
        """

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Images (N x H x W or N x H x W x C uint8) and labels (-1: none) of ``indices`` at once, for pools of
        fixed-size records, where per-sample Python costs more than the read; None (the default) where samples
        are read one at a time with :meth:`read`."""
        return None

    def keys(self, indices: np.ndarray) -> list[str]:
        return [self.key(int(i)) for i in indices]

    def parts(self, indices: np.ndarray) -> Iterator[tuple[Pool, np.ndarray, np.ndarray]]:
        """``(pool, its own indices, where they go in indices)`` for each pool ``indices`` fall in: this pool for
        most kinds; the sources of a mix, which read their runs of a batch each at once."""
        yield self, indices, np.arange(len(indices))

    def uid(self, index: int) -> str:
        return uid_of(self.source, self.key(index))

    def sample(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range for {len(self)} samples")
        image, label = self.read(index)
        return Sample(self.uid(index), self.source, self.key(index), to_chw_uint8(image), label)

    def __iter__(self) -> Iterator[Sample]:
        """Every readable sample in pool order; unreadable ones are skipped (use ``PoolDataset`` to see why)."""
        for index in range(len(self)):
            try:
                yield self.sample(index)
            except SampleError:
                continue

    def describe(self) -> dict[str, Any]:
        """What identifies this pool's content (kind and options), for manifests."""
        return {"kind": self.kind, "source": self.source, "size": len(self)}


def uid_of(source: str, key: str) -> str:
    """A sample's uid: ``<source>:<key>``, unique across a mix."""
    return f"{source}:{key}"


def to_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HW / HWC uint8 array, or CHW tensor -> contiguous uint8 CHW tensor with 1 or 3 channels."""
    if isinstance(image, torch.Tensor):
        tensor = image
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise SampleError(f"expected uint8 pixels, got {array.dtype}")
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3:
            array = array.transpose(2, 0, 1)
        else:
            raise SampleError(f"expected an HxW or HxWxC image, got shape {array.shape}")
        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # PIL's arrays are read-only
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise SampleError(f"expected 1 or 3 channels, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found at {path}: {fix}")
    return path


def require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} not found at {path}: {fix}")
    return path


def find_first(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


def check_split(kind: str, split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise UserError(f"{kind} has no split {split!r}: use one of {', '.join(allowed)}")
    return split
