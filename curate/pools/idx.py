"""MNIST-family datasets in the IDX format (gzip or not): mnist, fashion-mnist, kmnist.

Samples are read one record at a time with positioned reads. Gzipped files
are decompressed once into the user's cache folder and read from there, so
even EMNIST-sized files are never held in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np

from curate.cache import cache_dir, file_version
from curate.errors import UserError
from curate.pools.base import Pool, check_split, find_first
from curate.pools.filearray import FileArray
from curate.pools.registry import default_root, register

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _plain_copy(path: Path) -> Path:
    """Path of an uncompressed copy of ``path`` (itself when not gzipped)."""
    if path.suffix != ".gz":
        return path
    digest = hashlib.sha256(file_version(path).encode()).hexdigest()[:16]
    target = cache_dir() / "idx" / f"{path.stem}.{digest}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + f".{os.getpid()}.partial")
        try:
            with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError) as err:
            partial.unlink(missing_ok=True)
            raise UserError(f"{path} is not a readable gzip file ({err}): re-install or re-download it") from None
        os.replace(partial, target)
    return target


def read_idx(path: Path) -> FileArray:
    """An IDX file read record by record (after decompressing a gzipped one into the cache)."""
    plain = _plain_copy(path)
    with open(plain, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
            raise UserError(f"{path} is not an IDX file (bad magic number): check the file or re-download it")
        ndim = header[3]
        dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[header[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(dims)) * dtype.itemsize
    if plain.stat().st_size < expected:
        raise UserError(f"{path} is truncated ({plain.stat().st_size} of {expected} bytes): re-download it")
    return FileArray(plain, dtype, dims, offset)


class IdxPool(Pool):
    options = {"split": "train | test (default train)"}
    root_help = "folder with the IDX files (<root> or <root>/<kind> or <root>/<kind>/raw)"
    known_roots: tuple[Path, ...] = ()
    _transient = ("images", "labels")

    def __init__(self, root: Path | None = None, split: str = "train") -> None:
        self.split = check_split(self.kind, split, ("train", "test"))
        self.source = self.kind
        self.images_path, self.labels_path = self._locate(root)
        header_count = len(self.images)
        if len(self.labels) != header_count:
            raise UserError(
                f"{self.images_path} has {header_count} images but {self.labels_path} has "
                f"{len(self.labels)} labels: the two files belong to different datasets"
            )

    def _locate(self, root: Path | None) -> tuple[Path, Path]:
        prefix = _SPLIT_PREFIX[self.split]
        folders = [root] if root is not None else [default_root(), *self.known_roots]
        candidates = [d for base in folders for d in (base, base / self.kind, base / self.kind / "raw")]
        for folder in candidates:
            images = find_first([folder / f"{prefix}-images-idx3-ubyte{s}" for s in (".gz", "")])
            labels = find_first([folder / f"{prefix}-labels-idx1-ubyte{s}" for s in (".gz", "")])
            if images and labels:
                return images, labels
        searched = ", ".join(str(c) for c in candidates)
        raise UserError(
            f"{self.kind} {self.split} IDX files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {searched}: pass --root with the folder holding them"
        )

    @cached_property
    def images(self) -> FileArray:
        array = read_idx(self.images_path)
        if array.ndim != 3 or array.dtype != np.uint8:
            raise UserError(f"{self.images_path} holds {array.dtype} of shape {array.shape}, not N x H x W "
                            "uint8 images")
        return array

    @cached_property
    def labels(self) -> FileArray:
        return read_idx(self.labels_path)

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"{self.split}/{index}"

    def read(self, index: int) -> tuple[np.ndarray, int]:
        return np.array(self.images[index]), int(self.labels[index])

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images.take(indices), self.labels.take(indices).reshape(len(indices))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "files": [str(self.images_path), str(self.labels_path)]}


@register
class MnistPool(IdxPool):
    kind = "mnist"
    summary = "MNIST handwritten digits, IDX files"
    class_names = [str(d) for d in range(10)]


@register
class FashionMnistPool(IdxPool):
    kind = "fashion-mnist"
    summary = "Fashion-MNIST clothing images, IDX files (Debian: dataset-fashion-mnist)"
    known_roots = (Path("/usr/share/datasets/fashion-mnist"),)
    class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@register
class KmnistPool(IdxPool):
    kind = "kmnist"
    summary = "Kuzushiji-MNIST cursive Japanese characters, IDX files"
    class_names = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
