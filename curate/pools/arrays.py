"""Datasets stored as plain arrays: SVHN (.mat), STL-10 (binary), and any .npy file."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from curate.errors import UserError
from curate.pools.base import Pool, check_split, require_file
from curate.pools.filearray import FileArray, npy_array
from curate.pools.registry import default_root, register


@register
class SvhnPool(Pool):
    kind = "svhn"
    summary = "SVHN cropped digits, MATLAB files (train_32x32.mat, test_32x32.mat, extra_32x32.mat)"
    options = {"split": "train | test | extra (default train)"}
    root_help = "folder holding <split>_32x32.mat (or <root>/svhn)"
    class_names = [str(d) for d in range(10)]
    _transient = ("_arrays",)

    def __init__(self, root: Path | None = None, split: str = "train") -> None:
        self.split = check_split(self.kind, split, ("train", "test", "extra"))
        self.source = self.kind
        base = root if root is not None else default_root()
        name = f"{split}_32x32.mat"
        path = base / name if (base / name).is_file() else base / "svhn" / name
        self.path = require_file(path, f"SVHN {split} file {name}", "pass --root with the folder holding it")
        self.count = len(self._arrays[1])

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # loadmat reads the whole file: .mat v5 cannot be memory-mapped (SVHN extra is 1.6 GB).
        import scipy.io  # here: half a second of import that only SVHN's .mat files need

        try:
            mat = scipy.io.loadmat(self.path)
        except Exception as err:
            raise UserError(f"{self.path} is not a readable .mat file ({err}): re-download it") from None
        if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
            raise UserError(f"{self.path} lacks X (32x32x3xN) or y: is it really an SVHN file?")
        labels = mat["y"].reshape(-1).astype(np.int64) % 10  # SVHN stores digit 0 as label 10
        return mat["X"], labels

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"{self.split}/{index}"

    def read(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self._arrays
        return np.ascontiguousarray(images[:, :, :, index]), int(labels[index])

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._arrays
        return images[:, :, :, indices].transpose(3, 0, 1, 2), labels[indices]


@register
class Stl10Pool(Pool):
    kind = "stl10"
    summary = "STL-10 96x96, binary files (unlabeled_X.bin, train_X.bin/train_y.bin, test_X.bin/test_y.bin)"
    options = {"split": "unlabeled | train | test (default unlabeled)"}
    root_help = "folder holding stl10_binary/ (or that folder itself)"
    class_names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    _transient = ("images", "labels")
    side = 96

    def __init__(self, root: Path | None = None, split: str = "unlabeled") -> None:
        self.split = check_split(self.kind, split, ("unlabeled", "train", "test"))
        self.source = self.kind
        base = root if root is not None else default_root()
        folder = base / "stl10_binary" if (base / "stl10_binary").is_dir() else base
        fix = "pass --root with the folder holding stl10_binary/"
        self.images_path = require_file(folder / f"{split}_X.bin", f"STL-10 {split}_X.bin", fix)
        self.labels_path = None if split == "unlabeled" else require_file(folder / f"{split}_y.bin",
                                                                          f"STL-10 {split}_y.bin", fix)
        size = self.images_path.stat().st_size
        per_image = 3 * self.side * self.side
        if size % per_image:
            raise UserError(f"{self.images_path} is {size} bytes, not a whole number of 3x96x96 images: re-download it")
        self.count = size // per_image
        if self.labels_path is not None and self.labels_path.stat().st_size != self.count:
            raise UserError(f"{self.labels_path} does not hold one label per image of {self.images_path}")

    @cached_property
    def images(self) -> FileArray:
        return FileArray(self.images_path, np.uint8, (self.count, 3, self.side, self.side), 0)

    @cached_property
    def labels(self) -> np.ndarray | None:
        if self.labels_path is None:
            return None
        return np.fromfile(self.labels_path, dtype=np.uint8)  # one byte per image

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"{self.split}/{index}"

    def read(self, index: int) -> tuple[np.ndarray, int | None]:
        # STL-10 stores each channel column-major (MATLAB order): transpose to rows first.
        image = np.asarray(self.images[index]).transpose(2, 1, 0)
        label = None if self.labels is None else int(self.labels[index]) - 1  # labels are 1..10
        return image, label

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.full(len(indices), -1) if self.labels is None else self.labels[indices].astype(np.int64) - 1
        return self.images.take(indices).transpose(0, 3, 2, 1), labels


@register
class NpyPool(Pool):
    kind = "npy"
    summary = "a .npy array of uint8 images, N x H x W or N x H x W x C (read sample by sample)"
    options = {"labels": "optional .npy of N integer labels", "name": "source name (default: the file's stem)"}
    root_help = "the .npy file itself"
    _transient = ("images", "labels_array")

    def __init__(self, root: Path | None = None, labels: str | None = None, name: str | None = None) -> None:
        if root is None:
            raise UserError("the npy pool needs --root pointing at the .npy file")
        self.path = require_file(Path(root), "npy file", "pass --root with the path of the .npy array")
        self.labels_path = Path(labels) if labels else None
        self.source = name or self.path.stem
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise UserError(
                f"{self.path} holds {self.images.dtype} of shape {self.images.shape}: "
                "expected uint8 images N x H x W or N x H x W x C"
            )
        if self.images.ndim == 4 and self.images.shape[-1] not in (1, 3):
            raise UserError(f"{self.path}: last axis has {self.images.shape[-1]} channels, expected 1 or 3")
        if self.labels_array is not None and len(self.labels_array) != len(self.images):
            raise UserError(f"{self.labels_path} has {len(self.labels_array)} labels for {len(self.images)} images")

    @cached_property
    def images(self) -> FileArray:
        try:
            return npy_array(self.path)
        except ValueError as err:
            raise UserError(f"{self.path} is not a readable .npy array ({err}): save it with numpy.save") from None

    @cached_property
    def labels_array(self) -> np.ndarray | None:
        if self.labels_path is None:
            return None
        require_file(self.labels_path, "labels file", "fix the labels option")
        return np.load(self.labels_path, allow_pickle=False)

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return str(index)

    def read(self, index: int) -> tuple[np.ndarray, int | None]:
        label = None if self.labels_array is None else int(self.labels_array[index])
        return np.array(self.images[index]), label

    def read_many(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.full(len(indices), -1) if self.labels_array is None else self.labels_array[indices]
        return self.images.take(indices), labels

    def keys(self, indices: np.ndarray) -> list[str]:
        return [str(i) for i in indices.tolist()]

    def describe(self) -> dict:
        return {**super().describe(), "file": str(self.path)}
