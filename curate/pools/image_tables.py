"""The ``parquet`` pool kind: Parquet tables holding encoded images in a column, read in place, by row group.

Two layouts are common: the Hugging Face ``datasets`` one (an ``image`` column of structs with the file's
``bytes`` and its ``path``; class names in the ``huggingface`` schema metadata when the label is a
``ClassLabel``) and img2dataset's (a binary column named after the format, ``jpg``). Only footers are read
when the pool opens; a sample's row group is read when a sample of it is asked for, and the last few stay
in memory, so a reader in pool order reads each row group once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import UserError
from curate.pools.base import SampleError
from curate.pools.images import DECODING_OPTIONS, Decoding, EncodedImagePool
from curate.pools.registry import register
from curate.pools.remote import Location, OpenFiles, digest, map_files, resolve_files

ROW_GROUPS_KEPT = 2  # decoded row groups kept per process
OPEN_TABLES = 8  # Parquet files kept open per process


class TableFile(NamedTuple):
    """What a footer says about one file: rows per row group, the schema, a version for the pool's identity."""

    group_rows: np.ndarray
    schema: pa.Schema
    version: str


def read_footer(file: Location) -> TableFile:
    try:
        with file.open() as handle:
            meta = pq.ParquetFile(handle).metadata
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{file.name} is not a readable Parquet file ({err}): remove it from the files") from None
    rows = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
    return TableFile(rows, meta.schema.to_arrow_schema(), file.version())


def _holds_bytes(field: pa.Field) -> bool:
    if pa.types.is_struct(field.type):
        return field.type.get_field_index("bytes") >= 0 and _holds_bytes(field.type.field("bytes"))
    return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)


def choose_column(schema: pa.Schema, column: str | None, name: str) -> str:
    """The image column: the one asked for, else ``image``, else the only column holding bytes."""
    candidates = [f.name for f in schema if _holds_bytes(f)]
    if column is None:
        column = "image" if "image" in candidates else (candidates[0] if len(candidates) == 1 else None)
        if column is None:
            raise UserError(f"{name} has {'no' if not candidates else 'several'} image column(s) "
                            f"({', '.join(candidates) or 'none holds bytes'}): name one with -o column=NAME")
    if column not in schema.names:
        raise UserError(f"{name} has no column {column!r} (it has {', '.join(schema.names)}): fix the column option")
    if column not in candidates:
        raise UserError(f"column {column!r} of {name} holds {schema.field(column).type}, not image bytes (binary, or "
                        "a struct with bytes as Hugging Face writes): choose another with -o column=NAME")
    return column


def class_names_of(schema: pa.Schema, label: str) -> list[str] | None:
    """The ``ClassLabel`` names a Hugging Face dataset stores for ``label`` in its schema metadata."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
        names = features[label].get("names")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


@register
class ParquetImagePool(EncodedImagePool):
    kind = "parquet"
    summary = "Parquet tables with encoded images in a column (Hugging Face datasets, img2dataset), local or URLs"
    options = {
        "files": "glob, brace range or list of .parquet files and URLs; relative names are under --root (default: "
                 "every .parquet under --root)",
        "column": "the image column: binary (img2dataset's jpg) or a struct with bytes (Hugging Face's Image); "
                  "default image, else the only column holding bytes",
        "label": "integer column holding the class (default: none)",
        **DECODING_OPTIONS,
        "name": "source name (default parquet)",
    }
    root_help = "folder the file names are relative to"
    _transient = ("_groups",)

    def __init__(self, root: Path | None = None, files: str | list[str] | None = None, column: str | None = None,
                 label: str | None = None, square: str = "crop", background: str = "black", max_side: int = 256,
                 name: str = "parquet") -> None:
        self.decode = Decoding(square, background, int(max_side))
        self.source = name
        self.files = resolve_files(files or [], root, "Parquet files", "**/*.parquet")
        tables = map_files(read_footer, self.files, "reading Parquet footers")
        first = tables[0].schema
        self.column = choose_column(first, column, self.files[0].name)
        for file, table in zip(self.files, tables):
            choose_column(table.schema, self.column, file.name)
            if label is not None and label not in table.schema.names:
                raise UserError(f"{file.name} has no label column {label!r}: fix the label option")
            if label is not None and not pa.types.is_integer(table.schema.field(label).type):
                raise UserError(f"label column {label!r} of {file.name} holds {table.schema.field(label).type}, "
                                "not integers: name an integer class column")
        self.label = label
        self.class_names = class_names_of(first, label) if label is not None else None
        self.versions = [t.version for t in tables]
        file_rows = np.array([t.group_rows.sum() for t in tables], dtype=np.int64)
        if file_rows.sum() == 0:
            raise UserError(f"no rows in {len(self.files)} Parquet file(s) ({self.files[0].name}, ...)")
        self.file_starts = np.concatenate([[0], np.cumsum(file_rows)])
        self.group_starts = [np.concatenate([[0], np.cumsum(t.group_rows)]) for t in tables]
        self.open_tables = OpenFiles(OPEN_TABLES)  # footers are read once per file and process, not per row group

    def __len__(self) -> int:
        return int(self.file_starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        file = int(np.searchsorted(self.file_starts, index, side="right")) - 1
        return file, index - int(self.file_starts[file])

    def key(self, index: int) -> str:
        file, row = self._locate(index)
        return f"{self.files[file].basename}/{row}"

    def read_encoded(self, index: int) -> tuple[bytes, int | None]:
        file, row = self._locate(index)
        group = int(np.searchsorted(self.group_starts[file], row, side="right")) - 1
        images, labels = self._row_group(file, group)
        at = row - int(self.group_starts[file][group])
        cell = images[at]
        if isinstance(cell, pa.StructScalar):
            cell = cell["bytes"]
        data = cell.as_py()
        if not data:
            raise SampleError(f"no image bytes in column {self.column!r} of this row")
        label = None if labels is None or labels[at] is None else int(labels[at])
        return data, label

    def _row_group(self, file: int, group: int) -> tuple[pa.Array, list | None]:
        cache: OrderedDict = self.__dict__.setdefault("_groups", OrderedDict())
        if (file, group) not in cache:
            if len(cache) >= ROW_GROUPS_KEPT:
                cache.popitem(last=False)
            columns = [self.column] + ([self.label] if self.label is not None else [])
            try:
                parquet = self.open_tables.get(file, lambda: pq.ParquetFile(self.files[file].open()))
                table = parquet.read_row_group(group, columns=columns)
            except (pa.ArrowException, OSError) as err:
                raise UserError(f"cannot read row group {group} of {self.files[file].name} ({err}): the file "
                                "changed or is damaged") from None
            labels = table[self.label].to_pylist() if self.label is not None else None
            cache[(file, group)] = (table[self.column].combine_chunks(), labels)
        cache.move_to_end((file, group))
        return cache[(file, group)]

    def describe(self) -> dict:
        return {**super().describe(), "files": len(self.files), "first": self.files[0].name,
                "last": self.files[-1].name, "column": self.column, "label": self.label,
                "files_version": digest(self.versions)}
