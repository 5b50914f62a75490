"""A curated selection as WebDataset tar shards (`curate export --format webdataset`), for trainers outside
this project that stream WebDataset:

```
selected/shard-00000.tar ...   per sample KEY (its row number, zero-padded):
                                 KEY.png          the image in the teacher's input geometry (grey or RGB)
                                 KEY.logits.npy   the teacher's logits, float32 (the float16 values the Parquet
                                                  format stores, widened exactly)
                                 KEY.cls          the teacher's class (argmax of the logits)
                                 KEY.json         uid, source, weight, the pool's label (or null), teacher class
                                 KEY.embedding.npy  with --embedding
selected/_manifest.json        as for the Parquet format, with format curate.selected-webdataset/1
```

Keys are row numbers, not uids: a uid holds dots and slashes, which WebDataset reads as field and folder
separators. Tars are written deterministically (fixed times and owners), so one export gives one set of bytes.
`train distill` reads the Parquet format; this one is for other trainers.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.selected import NumberedShards


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png(image: np.ndarray) -> bytes:
    """A C x H x W uint8 image as PNG (lossless: the bytes decode to exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class TarShardWriter(NumberedShards):
    """Rows into tar shards of ``shard_rows`` samples each."""

    suffix = ".tar"

    def _open(self, path: Path) -> tarfile.TarFile:
        return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, rows: pa.Table, pixels: np.ndarray) -> None:
        """``rows`` with uid, source, logits, weight, label (and embedding), ``pixels`` one C x H x W image each."""
        logits = np.asarray(rows["logits"].combine_chunks().flatten(), dtype=np.float32).reshape(rows.num_rows, -1)
        embedding = None
        if "embedding" in rows.column_names:
            embedding = np.asarray(rows["embedding"].combine_chunks().flatten(), dtype=np.float32)
            embedding = embedding.reshape(rows.num_rows, -1)
        uids, sources = rows["uid"].to_pylist(), rows["source"].cast(pa.string()).to_pylist()
        weights, labels = rows["weight"].to_pylist(), rows["label"].to_pylist()
        for i in range(rows.num_rows):
            teacher_class = int(logits[i].argmax())
            fields = {
                "cls": str(teacher_class).encode(),
                "embedding.npy": None if embedding is None else _npy(embedding[i]),
                "json": json.dumps({"uid": uids[i], "source": sources[i], "weight": weights[i], "label": labels[i],
                                    "teacher_class": teacher_class}).encode(),
                "logits.npy": _npy(logits[i]),
                "png": _png(pixels[i]),
            }
            self._add(fields)

    def _add(self, fields: dict[str, bytes | None]) -> None:
        key = f"{self.rows_written:09d}"  # the row's number in the export
        tar = self._current()
        for field, data in fields.items():
            if data is None:
                continue
            member = tarfile.TarInfo(f"{key}.{field}")
            member.size, member.mode, member.mtime = len(data), 0o444, 0
            tar.addfile(member, io.BytesIO(data))
        self._wrote(1)
