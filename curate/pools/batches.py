"""Datasets shipped as pickled batches: CIFAR-10/100 (python version) and downsampled ImageNet 32/64.

Each batch file is a pickled dict with ``data`` (N x 3*S*S uint8, channel-planar)
and labels, read by an unpickler that builds plain data and numpy arrays only
(curate/pools/safe_pickle.py). Batches are unpickled on demand, a couple at a
time per process, so a pool over ImageNet64's 10 batch files never holds more
than two of them.
"""

from __future__ import annotations

import pickle
from bisect import bisect_right
from functools import cached_property
from pathlib import Path

import numpy as np

from curate.errors import UserError
from curate.pools.base import Pool, check_split
from curate.pools.registry import default_root, register
from curate.pools.safe_pickle import load_batch_pickle


def load_batch(path: Path) -> dict[str, np.ndarray]:
    """Unpickle one batch file into ``{"data": N x C*S*S uint8, "labels": N int64}``; keys as str."""
    try:
        raw = load_batch_pickle(path)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"batch file {path} disappeared: check --root") from None
    except Exception as err:  # a corrupt pickle can raise nearly anything
        raise UserError(f"{path} is not a readable pickled batch ({type(err).__name__}: {err}): "
                        "re-download it") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a dict batch: is it really a {path.parent.name} batch file?")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    label_key = next((k for k in ("labels", "fine_labels") if k in batch), None)
    if "data" not in batch or label_key is None:
        raise UserError(f"{path} lacks 'data' or 'labels': is it really a {path.parent.name} batch file?")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or len(data) != len(labels):
        raise UserError(f"{path}: data of shape {data.shape} does not match {len(labels)} labels")
    return {"data": data, "labels": labels}


class BatchPool(Pool):
    """Shared reader; subclasses say which files make a split and how labels are numbered."""

    options = {"split": "train | test (default train)"}
    label_offset: int = 0
    splits: tuple[str, ...] = ("train", "test")
    _transient = ("_batches",)

    def __init__(self, root: Path | None = None, split: str = "train") -> None:
        self.split = check_split(self.kind, split, self.splits)
        self.source = self.kind
        self.files = self._locate(root if root is not None else default_root())
        self.counts = [len(load_batch(f)["labels"]) for f in self.files]
        self.starts = list(np.cumsum([0, *self.counts[:-1]]))

    def _locate(self, root: Path) -> list[Path]:
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(self.counts)

    def _batch(self, number: int) -> dict[str, np.ndarray]:
        cache = self.__dict__.setdefault("_batches", {})
        if number not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[number] = load_batch(self.files[number])
        return cache[number]

    def _locate_index(self, index: int) -> tuple[int, int]:
        number = bisect_right(self.starts, index) - 1
        return number, index - self.starts[number]

    def key(self, index: int) -> str:
        number, row = self._locate_index(index)
        return f"{self.files[number].name}/{row}"

    def read(self, index: int) -> tuple[np.ndarray, int]:
        number, row = self._locate_index(index)
        batch = self._batch(number)
        flat = batch["data"][row]
        size = int(round((flat.size / 3) ** 0.5))
        if 3 * size * size != flat.size:
            raise UserError(f"{self.files[number]}: rows of {flat.size} bytes are not 3 x S x S images")
        image = flat.reshape(3, size, size).transpose(1, 2, 0)
        return image, int(batch["labels"][row]) - self.label_offset

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "files": [str(f) for f in self.files]}


def _missing(kind: str, root: Path, what: str, folder: str) -> UserError:
    return UserError(f"{kind} {what} not found under {root}: pass --root with the folder holding {folder}")


@register
class Cifar10Pool(BatchPool):
    kind = "cifar10"
    summary = "CIFAR-10, python pickles (cifar-10-batches-py/)"
    root_help = "folder holding cifar-10-batches-py/ (or that folder itself)"
    class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def _locate(self, root: Path) -> list[Path]:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if self.split == "train" else ["test_batch"]
        files = [folder / n for n in names if (folder / n).is_file()]
        if not files:
            raise _missing(self.kind, root, f"{self.split} batches ({', '.join(names)})", "cifar-10-batches-py/")
        return files


@register
class Cifar100Pool(BatchPool):
    kind = "cifar100"
    summary = "CIFAR-100 (fine labels), python pickles (cifar-100-python/)"
    root_help = "folder holding cifar-100-python/ (or that folder itself)"

    def _locate(self, root: Path) -> list[Path]:
        folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        path = folder / self.split
        if not path.is_file():
            raise _missing(self.kind, root, f"{self.split} file", "cifar-100-python/")
        return [path]

    @cached_property
    def class_names(self) -> list[str] | None:  # type: ignore[override]
        meta = self.files[0].parent / "meta"
        if not meta.is_file():
            return None
        try:
            names = load_batch_pickle(meta).get("fine_label_names")
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise UserError(f"{meta} is not a readable CIFAR-100 meta file ({err}): re-download it") from None
        return [str(name) for name in names] if names else None


class DownsampledImagenetPool(BatchPool):
    label_offset = 1  # the batches number classes 1..1000
    splits = ("train", "val")
    options = {"split": "train | val (default train)"}
    root_help = "folder with train_data_batch_* and/or val_data (searched recursively)"

    def _locate(self, root: Path) -> list[Path]:
        if not root.is_dir():
            raise _missing(self.kind, root, "folder", "train_data_batch_* / val_data")
        pattern = "train_data_batch_*" if self.split == "train" else "val_data"
        files = sorted(root.rglob(pattern), key=lambda p: (str(p.parent), _batch_number(p)))
        files = [f for f in files if f.is_file() and not f.suffix == ".npz"]
        if not files:
            raise _missing(self.kind, root, f"{pattern} files", f"the {self.kind} {pattern} files")
        return files


def _batch_number(path: Path) -> int:
    tail = path.name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


@register
class Imagenet32Pool(DownsampledImagenetPool):
    kind = "imagenet32"
    summary = "Downsampled ImageNet 32x32, pickled batches (train_data_batch_1..10, val_data)"


@register
class Imagenet64Pool(DownsampledImagenetPool):
    kind = "imagenet64"
    summary = "Downsampled ImageNet 64x64, pickled batches (train_data_batch_1..10, val_data)"
