"""The ``webdataset`` pool kind: tar shards as img2dataset, DataComp and WebDataset write them, read in place.

A shard is a tar whose members are grouped into samples by key, as WebDataset does: ``dir/KEY.jpg``,
``dir/KEY.cls`` and ``dir/KEY.json`` are the ``jpg``, ``cls`` and ``json`` fields of sample ``dir/KEY`` (the
key ends at the first dot of the file name), and consecutive members with one key make one sample. A sample
is read back by position without scanning its tar: each shard's member list (name, data offset, size) is
built once, by one pass over its headers, and cached on disk under the shard's name, size and modification
time (in ``$XDG_CACHE_HOME/curate``, default ``~/.cache/curate``). A truncated tar keeps the members before the cut; a
sample without a usable image member, or whose bytes do not decode, is reported with its uid and reason
when read, never fatal.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import temporary_name
from curate.errors import UserError
from curate.pools.base import Pool, SampleError
from curate.pools.idx import cache_dir
from curate.pools.images import DECODING_OPTIONS, Decoding
from curate.pools.registry import register
from curate.pools.remote import Location, digest, map_files, resolve_files

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp"]
# WebDataset's rule: the key is the member path up to the first dot of its file name, the field the rest.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_INDEX_FORMAT = "1"
OPEN_SHARDS = 8  # shard handles kept open per process


class ShardMembers:
    """The regular-file members of one tar shard in order, with where their data starts and its size; and
    the size of the file, so members cut off by a truncation are known."""

    def __init__(self, names: list[str], offsets: np.ndarray, sizes: np.ndarray, file_size: int, truncated: bool,
                 version: str) -> None:
        self.names, self.offsets, self.sizes, self.file_size = names, offsets, sizes, file_size
        self.truncated, self.version = truncated, version

    @classmethod
    def scan(cls, shard: Location) -> ShardMembers:
        """One pass over the tar's headers (data is skipped, not read). Stops at a truncation; a file that is
        not a tar at all is a user error naming it."""
        names, offsets, sizes = [], [], []
        with shard.open() as raw:
            try:
                with tarfile.open(fileobj=raw, mode="r:") as tar:
                    while True:
                        try:
                            member = tar.next()
                        except tarfile.ReadError:  # a header cut off or damaged: keep what came before
                            break
                        if member is None:
                            break
                        if member.isfile():
                            names.append(member.name)
                            offsets.append(member.offset_data)
                            sizes.append(member.size)
            except tarfile.ReadError as err:
                raise UserError(f"{shard.name} is not a tar file ({err}): remove it from the shard list") from None
            # A whole tar ends with two zero blocks after its last member's data (padded to 512 bytes).
            end = offsets[-1] + -(-sizes[-1] // 512) * 512 if names else 0
            raw.seek(end)
            tail = raw.read(1024)
            truncated = len(tail) < 1024 or any(tail)
        return cls(names, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                   int(shard.info()["size"]), truncated, shard.version())

    @classmethod
    def cached(cls, shard: Location) -> ShardMembers:
        """The members of ``shard`` from the cache when its name, size and time match; scanned (and cached)
        otherwise. A cache that cannot be written is skipped: the scan is then repeated next time."""
        path = cache_dir() / "webdataset-index" / f"{shard.version()}.parquet"
        try:
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(b"format") == _INDEX_FORMAT.encode() and meta.get(b"shard") == shard.name.encode():
                return cls(table["name"].to_pylist(), table["offset"].to_numpy(), table["size"].to_numpy(),
                           int(meta[b"file_size"]), meta[b"truncated"] == b"1", shard.version())
        except (OSError, KeyError, ValueError, pa.ArrowException):
            pass  # absent or unreadable: scan again
        members = cls.scan(shard)
        table = pa.table({"name": pa.array(members.names, pa.string()), "offset": members.offsets,
                          "size": members.sizes})
        table = table.replace_schema_metadata({"format": _INDEX_FORMAT, "shard": shard.name,
                                               "file_size": str(members.file_size),
                                               "truncated": str(int(members.truncated))})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = temporary_name(path)
            pq.write_table(table, temp)
            os.replace(temp, path)
        except OSError:
            pass
        return members


class ShardSamples:
    """The samples of one shard: key, and (offset, size) of the chosen image member and of ``cls`` (-1: none)."""

    def __init__(self, members: ShardMembers, extensions: list[str]) -> None:
        keys: list[str] = []
        fields: list[dict[str, int]] = []
        for number, name in enumerate(members.names):
            found = _KEY_FIELD.match(name)
            if found is None or Path(name).name.startswith("__"):
                continue  # no extension (or WebDataset's own metadata): not a field of any sample
            key, field = found.group(1), found.group(2).lower()
            if not keys or keys[-1] != key:
                keys.append(key)
                fields.append({})
            fields[-1].setdefault(field, number)
        self.keys = keys
        self.fields = [sorted(f) for f in fields]
        self.image = np.array([next((f[e] for e in extensions if e in f), -1) for f in fields], dtype=np.int64)
        self.cls = np.array([f.get("cls", -1) for f in fields], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)


@register
class WebDatasetPool(Pool):
    cheap_to_read = False
    kind = "webdataset"
    summary = "WebDataset tar shards (img2dataset, DataComp), local or at fsspec URLs (s3://, gs://, https://)"
    options = {
        "shards": "glob, brace range (shards-{000000..000999}.tar) or list of files and URLs; relative names are "
                  "under --root (default: every .tar under --root)",
        "image": f"image member extensions, in order of preference (default {IMAGE_EXTENSIONS})",
        "labels": "true: a sample's cls member (an integer) is its label (default false)",
        **DECODING_OPTIONS,
        "name": "source name (default webdataset)",
    }
    root_help = "folder the shard names are relative to"
    _transient = ("_handles",)

    def __init__(self, root: Path | None = None, shards: str | list[str] | None = None,
                 image: str | list[str] = IMAGE_EXTENSIONS, labels: bool = False, square: str = "crop",
                 background: str = "black", max_side: int = 256, name: str = "webdataset") -> None:
        self.extensions = [e.lower().lstrip(".") for e in ([image] if isinstance(image, str) else image)]
        if not self.extensions:
            raise UserError("the image option lists no extension: give e.g. image=['jpg','png']")
        self.decode = Decoding(square, background, int(max_side))
        self.labels = labels
        self.source = name
        self.shards = resolve_files(shards or [], root, "tar shards", "**/*.tar")
        members = map_files(ShardMembers.cached, self.shards, "indexing tar shards")  # a missing shard fails here
        self.versions = [m.version for m in members]
        samples = [ShardSamples(m, self.extensions) for m in members]
        counts = np.array([len(s) for s in samples], dtype=np.int64)
        if counts.sum() == 0:
            raise UserError(f"no samples in {len(self.shards)} tar shard(s) ({self.shards[0].name}, ...): "
                            "check the shards option")
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.shard_of = np.repeat(np.arange(len(samples), dtype=np.int32), counts)
        self.keys_array = pa.array([k for s in samples for k in s.keys], pa.string())
        self.fields = pa.array([",".join(f) for s in samples for f in s.fields], pa.string())
        image = np.concatenate([s.image for s in samples])
        cls = np.concatenate([s.cls for s in samples])
        self.member_offset, self.member_size = _member_table(members, samples, image)
        self.cls_offset, self.cls_size = _member_table(members, samples, cls)
        self.file_size = np.array([m.file_size for m in members], dtype=np.int64)
        # the last sample of a truncated shard may have lost members to the cut: its errors say so
        self.cut_short = np.zeros(len(self.shard_of), dtype=bool)
        self.cut_short[[self.starts[n + 1] - 1 for n, m in enumerate(members) if m.truncated and counts[n]]] = True

    def __len__(self) -> int:
        return len(self.shard_of)

    def key(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]].basename}/{self.keys_array[index].as_py()}"

    def read(self, index: int) -> tuple[np.ndarray, int | None]:
        shard = int(self.shard_of[index])
        if self.member_size[index] < 0 and self.cut_short[index]:
            raise SampleError("the tar is truncated: this sample's image member is cut off")
        if self.member_size[index] < 0:
            raise SampleError(f"no image member ({', '.join(self.extensions)}) in this sample; it has: "
                              f"{self.fields[index].as_py() or 'nothing'}")
        data = self._member(shard, int(self.member_offset[index]), int(self.member_size[index]))
        label = None
        if self.labels and self.cls_size[index] >= 0:
            text = self._member(shard, int(self.cls_offset[index]), int(self.cls_size[index]))
            try:
                label = int(text.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise SampleError(f"cls member is not an integer: {text[:40]!r}") from None
        return self.decode(data, self.key(index)), label

    def _member(self, shard: int, offset: int, size: int) -> bytes:
        if offset + size > self.file_size[shard]:
            raise SampleError(f"the tar is truncated: this member ends at byte {offset + size:,} of "
                              f"{self.file_size[shard]:,}")
        handles: OrderedDict = self.__dict__.setdefault("_handles", OrderedDict())
        if shard not in handles:
            if len(handles) >= OPEN_SHARDS:
                handles.popitem(last=False)[1].close()
            handles[shard] = self.shards[shard].open()
        handles.move_to_end(shard)
        data = self.shards[shard].read_at(handles[shard], offset, size)
        if len(data) != size:
            raise SampleError(f"the tar is truncated: {len(data):,} of {size:,} bytes of this member")
        return data

    def describe(self) -> dict:
        return {**super().describe(), "shards": len(self.shards), "first": self.shards[0].name,
                "last": self.shards[-1].name, "image": self.extensions, "labels": self.labels,
                "shards_version": digest(self.versions)}


def _member_table(members: list[ShardMembers], samples: list[ShardSamples],
                  chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data offset and size of one member per sample (member numbers in ``chosen``, -1: none)."""
    offsets = np.full(len(chosen), -1, dtype=np.int64)
    sizes = np.full(len(chosen), -1, dtype=np.int64)
    start = 0
    for m, s in zip(members, samples):
        numbers = chosen[start:start + len(s)]
        present = numbers >= 0
        offsets[start:start + len(s)][present] = m.offsets[numbers[present]]
        sizes[start:start + len(s)][present] = m.sizes[numbers[present]]
        start += len(s)
    return offsets, sizes
