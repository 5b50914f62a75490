"""Writers of small dataset files in each official on-disk format, used by the tests."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io
from PIL import Image


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """IDX: magic (0, 0, dtype code 0x08, ndim), big-endian dims, then the raw uint8 values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)


def planar(images_hwc: np.ndarray) -> np.ndarray:
    """N x S x S x 3 -> N x 3*S*S, channel-planar rows (all R, then G, then B), as CIFAR and ImageNet32 store them."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, batches: list[tuple[np.ndarray, np.ndarray]],
                  test: tuple[np.ndarray, np.ndarray]) -> None:
    """cifar-10-batches-py/data_batch_i and test_batch, keys as bytes like the original Python 2 pickles."""
    folder = root / "cifar-10-batches-py"
    for i, (images, labels) in enumerate(batches, 1):
        write_pickle(folder / f"data_batch_{i}", {b"data": planar(images), b"labels": labels.tolist()})
    write_pickle(folder / "test_batch", {b"data": planar(test[0]), b"labels": test[1].tolist()})


def write_cifar100(root: Path, images: np.ndarray, fine: np.ndarray, names: list[str]) -> None:
    folder = root / "cifar-100-python"
    write_pickle(folder / "train", {b"data": planar(images), b"fine_labels": fine.tolist(),
                                    b"coarse_labels": (fine // 5).tolist()})
    write_pickle(folder / "meta", {"fine_label_names": names})


def write_imagenet32(root: Path, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """train_data_batch_1.. with ``data`` channel-planar and ``labels`` numbered 1..1000."""
    for i, (images, labels_zero_based) in enumerate(batches, 1):
        write_pickle(root / f"train_data_batch_{i}", {"data": planar(images),
                                                      "labels": (labels_zero_based + 1).tolist(),
                                                      "mean": np.zeros(3 * images.shape[1] ** 2)})


def write_svhn(root: Path, split: str, images: np.ndarray, digits: np.ndarray) -> None:
    """X is 32 x 32 x 3 x N; y is N x 1 with digit 0 stored as 10."""
    root.mkdir(parents=True, exist_ok=True)
    y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})


def write_stl10(root: Path, split: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Each image channel by channel, each channel column-major; labels 1..10 as uint8."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
    if labels is not None:
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_webdataset(folder: Path, images: np.ndarray, labels: np.ndarray, per_shard: int) -> Path:
    """WebDataset shards as the `webdataset` library writes them: KEY.png, KEY.cls, KEY.json per sample."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shards-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (image, label) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"digit{i:05d}", "png": Image.fromarray(image), "cls": int(label),
                        "json": {"index": i}})
    return folder


def write_img2dataset(path: Path, images: np.ndarray, row_group: int) -> None:
    """img2dataset's parquet output: key, the image bytes in a binary column named after the format, status."""
    table = pa.table({"key": [f"{i:09d}" for i in range(len(images))],
                      "jpg": pa.array([encoded(im, "PNG") for im in images], pa.binary()),
                      "status": ["success"] * len(images)})
    pq.write_table(table, path, row_group_size=row_group)
