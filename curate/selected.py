"""The curated-shard format (`selected/`): what `curate export` writes and `train distill` streams.

```
selected/shard-00000.parquet ...  uid, source, pixels, logits, weight, label (+ embedding), in row groups
selected/_manifest.json           teacher, image shape, input spec, class names, rows and files per shard,
                                  provenance
```

``pixels`` holds raw uint8 bytes of ``image_shape`` (C, H, W): the trainer needs neither the pool nor its
decoders. Every shard repeats the format, image shape, class names and the teacher's fingerprint in its
schema metadata, so shards of two exports cannot be mixed unnoticed. This module is the one home of the
format: its writer (``manifest_for``, ``shard_schema``, ``rows_table``, ``ShardWriter``), its checked
opener (``CuratedShards.open``) and the pixel decoder (``decode_pixels``); it needs no DuckDB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import read_json_object
from curate.errors import UserError
from curate.spec import InputSpec

FORMAT = "curate.selected/1"
TARS_FORMAT = "curate.selected-webdataset/1"  # the same rows as WebDataset tars (curate/selected_tars.py)
MANIFEST = "_manifest.json"
SCHEMA_KEYS = ("format", "image_shape", "class_names", "num_classes")  # manifest entries every shard repeats


def manifest_for(fingerprint: str, teacher_meta: dict[str, Any], spec: InputSpec, class_names: list[str],
                 num_classes: int) -> dict[str, Any]:
    """The manifest's fixed part; the writer of a folder adds rows, shards and provenance."""
    return {"format": FORMAT, "teacher": {"fingerprint": fingerprint, "meta": teacher_meta},
            "image_shape": list(spec.shape()), "input_spec": spec.to_meta(), "class_names": class_names,
            "num_classes": num_classes}


def shard_schema(manifest: dict[str, Any], embedding_dim: int | None) -> pa.Schema:
    fields = [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.dictionary(pa.int32(), pa.string())),
        pa.field("pixels", pa.binary(), nullable=False),
        pa.field("logits", pa.list_(pa.float16(), manifest["num_classes"]), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("label", pa.int32()),
    ]
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float16(), embedding_dim)))
    metadata = {k: manifest[k] for k in SCHEMA_KEYS} | {"teacher_fingerprint": manifest["teacher"]["fingerprint"]}
    return pa.schema(fields, metadata={"curate": json.dumps(metadata)})


def rows_table(schema: pa.Schema, uid: Any, source: Any, pixels: np.ndarray, logits: Any, weight: Any, label: Any,
               embedding: Any = None) -> pa.Table:
    """Rows in the shard schema: ``pixels`` a uint8 array with one image per row, ``source`` an Arrow array of
    strings (plain or dictionary), the other columns anything Arrow takes."""
    columns = {
        "uid": uid, "source": source.cast(pa.string()).dictionary_encode(),
        "pixels": pa.array([image.tobytes() for image in pixels.reshape(len(pixels), -1)], pa.binary()),
        "logits": logits, "weight": weight, "label": label,
    }
    if embedding is not None:
        columns["embedding"] = embedding
    return pa.table(columns).cast(schema)


def decode_pixels(pixels: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """The ``pixels`` column of a shard (``path``) as one uint8 array (rows, *shape), without a copy per row;
    a row of another size than ``shape`` is refused."""
    if isinstance(pixels, pa.ChunkedArray):
        pixels = pixels.combine_chunks()
    _, offsets, data = pixels.buffers()
    flat = np.frombuffer(data, dtype=np.uint8)
    starts = np.frombuffer(offsets, dtype=np.int32)[pixels.offset:pixels.offset + len(pixels) + 1]
    if not np.all(np.diff(starts) == int(np.prod(shape))):
        raise UserError(f"shard {path} has images of another size than {shape}")
    return flat[starts[0]:starts[-1]].reshape(-1, *shape)


class NumberedShards:
    """Files ``shard-00000<suffix>``, ``shard-00001<suffix>``, ... in ``folder``, each closed once it holds
    ``shard_rows`` rows or more, and the manifest's list of them (``entries``). Subclasses open the file."""

    suffix: str

    def __init__(self, folder: Path, shard_rows: int) -> None:
        self.folder = Path(folder)
        self.shard_rows = shard_rows
        self.entries: list[dict[str, Any]] = []  # the manifest's shard list
        self._file: Any = None
        self._rows = 0

    def _open(self, path: Path) -> Any:
        raise NotImplementedError

    @property
    def _name(self) -> str:
        return f"shard-{len(self.entries):05d}{self.suffix}"

    @property
    def rows_written(self) -> int:
        return sum(entry["rows"] for entry in self.entries) + self._rows

    def _current(self) -> Any:
        """The shard being written, opened on its first row."""
        if self._file is None:
            self._file = self._open(self.folder / self._name)
        return self._file

    def _wrote(self, rows: int) -> None:
        self._rows += rows
        if self._rows >= self.shard_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self.entries.append({"file": self._name, "rows": self._rows})
        self._file, self._rows = None, 0

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close_shard()
        return self.entries


class ShardWriter(NumberedShards):
    """Tables of rows into Parquet shards in row groups of ``row_group_rows``."""

    suffix = ".parquet"

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int, row_group_rows: int) -> None:
        super().__init__(folder, shard_rows)
        self.schema = schema
        self.row_group_rows = row_group_rows

    def _open(self, path: Path) -> pq.ParquetWriter:
        return pq.ParquetWriter(path, self.schema)

    def write(self, table: pa.Table) -> None:
        self._current().write_table(table, row_group_size=self.row_group_rows)
        self._wrote(table.num_rows)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1))


@dataclass(frozen=True)
class ShardLayout:
    """One shard file of a curated folder: its rows and how they fall into row groups."""

    path: Path
    rows: int
    group_rows: tuple[int, ...]  # rows per row group

    @property
    def group_starts(self) -> np.ndarray:
        """First row of every row group, then the row count."""
        return np.cumsum((0,) + self.group_rows)


@dataclass
class CuratedShards:
    """A ``selected/`` folder, checked: one teacher, one image shape, readable shards matching the manifest."""

    folder: Path
    manifest: dict[str, Any]
    files: list[ShardLayout]
    weights: np.ndarray  # float32 per row, shards concatenated in manifest order
    embedding_dim: int | None  # None unless every shard stores the teacher embedding

    @classmethod
    def open(cls, folder: Path) -> CuratedShards:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"no shard folder {folder}: run `curate export --out {folder}` first")
        if not (folder / MANIFEST).exists():
            found = "is empty" if not any(folder.iterdir()) else f"has no {MANIFEST}"
            raise UserError(f"{folder} {found}: give a folder written by `curate export`")
        manifest = read_json_object(folder / MANIFEST, "export the selection again")
        if manifest.get("format") == TARS_FORMAT:
            raise UserError(f"{folder} holds WebDataset tars (curate export --format webdataset), for other "
                            "trainers: train distill streams the Parquet format; export again without --format")
        if manifest.get("format") != FORMAT:
            raise UserError(f"{folder} is not a curated shard folder ({manifest.get('format')})")
        extra = sorted({p.name for p in folder.glob("shard-*.parquet")} - {e["file"] for e in manifest["shards"]})
        if extra:
            raise UserError(f"{folder} holds {', '.join(extra[:3])} that {MANIFEST} does not list: shards of "
                            "another export were copied in; export into a fresh folder")
        files, weights, embedding = [], [], []
        for entry in manifest["shards"]:
            path = folder / entry["file"]
            try:
                parquet = pq.ParquetFile(path)
                meta = json.loads((parquet.schema_arrow.metadata or {}).get(b"curate", b"{}"))
                shard_weights = parquet.read(columns=["weight"])["weight"].to_numpy()
            except (OSError, pa.ArrowException, json.JSONDecodeError, KeyError) as err:
                raise UserError(f"shard {path} is missing or corrupt ({err}): export the selection again") from None
            if meta.get("teacher_fingerprint") != manifest["teacher"]["fingerprint"]:
                raise UserError(f"{path.name} comes from another teacher than {MANIFEST}: do not mix shards of "
                                "two exports; export into a fresh folder")
            if meta.get("image_shape") != manifest["image_shape"]:
                raise UserError(f"{path.name} holds images of shape {meta.get('image_shape')}, the manifest "
                                f"{manifest['image_shape']}: do not mix shards of two exports")
            if parquet.metadata.num_rows != entry["rows"]:
                raise UserError(f"{path.name} has {parquet.metadata.num_rows} rows, the manifest says {entry['rows']}: "
                                "export the selection again")
            groups = tuple(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups))
            files.append(ShardLayout(path, entry["rows"], groups))
            weights.append(shard_weights.astype(np.float32))
            names = parquet.schema_arrow.names
            embedding.append(parquet.schema_arrow.field("embedding").type.list_size if "embedding" in names else None)
        if not files or sum(f.rows for f in files) == 0:
            raise UserError(f"{folder} holds no rows: select and export a non-empty selection")
        dims = set(embedding)
        return cls(folder, manifest, files, np.concatenate(weights), dims.pop() if len(dims) == 1 else None)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def row_offsets(self) -> np.ndarray:
        """Row number of every shard's first row across the shards in manifest order, then the total."""
        return np.concatenate([[0], np.cumsum([f.rows for f in self.files])]).astype(np.int64)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])
