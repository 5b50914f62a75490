"""The ``webdataset`` pool kind: tar shards as img2dataset, DataComp and WebDataset write them, read in place.

A shard is a tar whose members are grouped into samples by key, as WebDataset does: ``dir/KEY.jpg``,
``dir/KEY.cls`` and ``dir/KEY.json`` are the ``jpg``, ``cls`` and ``json`` fields of sample ``dir/KEY`` (the
key ends at the first dot of the file name), and consecutive members with one key make one sample. A sample
is read back by position without scanning its tar: each shard's member list (name, data offset, size) is
built once, by one pass over its headers (curate/pools/tar_index.py), and cached on disk under the shard's
name, size and modification time (in ``$XDG_CACHE_HOME/curate``, default ``~/.cache/curate``). A truncated tar
keeps the members before the cut; a sample without a usable image member, or whose bytes do not decode, is
reported with its uid and reason when read, never fatal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.atomic import temporary_name
from curate.cache import cache_dir
from curate.errors import UserError
from curate.pools.base import SampleError
from curate.pools.images import DECODING_OPTIONS, Decoding, EncodedImagePool
from curate.pools.registry import register
from curate.pools.remote import Location, OpenFiles, digest, map_files, resolve_files
from curate.pools.tar_index import NotATar, list_members

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp"]
# WebDataset's rule: the key is the member path up to the first dot of its file name, the field the rest.
_KEY_FIELD = r"^(?P<key>(?:.*/|)[^./]+)\.(?P<field>[^/]*)$"
_KEY_FIELD_RE = re.compile(_KEY_FIELD)
_INDEX_FORMAT = "2"  # 2: listed by curate/pools/tar_index.py
OPEN_SHARDS = 8  # shard handles kept open per process


class ShardMembers:
    """The regular-file members of one tar shard in order, with where their data starts and its size; and
    the size of the file, so members cut off by a truncation are known."""

    def __init__(self, names: pa.StringArray, offsets: np.ndarray, sizes: np.ndarray, file_size: int,
                 truncated: bool, version: str) -> None:
        self.names, self.offsets, self.sizes, self.file_size = names, offsets, sizes, file_size
        self.truncated, self.version = truncated, version

    @classmethod
    def scan(cls, shard: Location) -> ShardMembers:
        """One pass over the tar's headers (data is skipped, not read). Stops at a truncation; a file that is
        not a tar at all is a user error naming it."""
        with shard.open() as raw:
            try:
                listing = list_members(raw)
            except NotATar as err:
                raise UserError(f"{shard.name} is not a tar file ({err}): remove it from the shard list") from None
        return cls(pa.array(listing.names, pa.string()), np.array(listing.offsets, dtype=np.int64),
                   np.array(listing.sizes, dtype=np.int64), int(shard.info()["size"]), listing.truncated,
                   shard.version())

    @classmethod
    def cached(cls, shard: Location) -> ShardMembers:
        """The members of ``shard`` from the cache when its name, size and time match; scanned (and cached)
        otherwise. A cache that cannot be written is skipped: the scan is then repeated next time."""
        path = cache_dir() / "webdataset-index" / f"{shard.version()}.parquet"
        try:
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(b"format") == _INDEX_FORMAT.encode() and meta.get(b"shard") == shard.name.encode():
                return cls(table["name"].combine_chunks(), table["offset"].to_numpy(), table["size"].to_numpy(),
                           int(meta[b"file_size"]), meta[b"truncated"] == b"1", shard.version())
        except (OSError, KeyError, ValueError, pa.ArrowException):
            pass  # absent or unreadable: scan again
        members = cls.scan(shard)
        table = pa.table({"name": members.names, "offset": members.offsets, "size": members.sizes})
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


@dataclass
class Samples:
    """Members grouped into samples: for each sample the member number of its first member, of its image
    member and of its ``cls`` member (-1: none)."""

    first: np.ndarray
    image: np.ndarray
    cls: np.ndarray


def group_members(names: pa.StringArray, shard_of: np.ndarray, extensions: list[str]) -> Samples:
    """WebDataset's grouping, vectorised (a million members take a second, not a minute): members with an
    extension, consecutive ones with one key in one shard make a sample; its image member is the first of the
    preferred extension present. Names without an extension, and WebDataset's own ``__`` files, are skipped."""
    parts = pc.extract_regex(names, _KEY_FIELD)
    usable = pc.and_(pc.is_valid(parts), pc.invert(pc.match_substring_regex(names, r"(^|/)__[^/]*$")))
    usable = usable.fill_null(False).to_numpy(zero_copy_only=False)
    members = np.flatnonzero(usable)
    keys = pc.struct_field(parts, "key").filter(pa.array(usable))
    fields = pc.utf8_lower(pc.struct_field(parts, "field").filter(pa.array(usable)))
    new = np.ones(len(members), dtype=bool)
    if len(members) > 1:
        changed = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False)
        new[1:] = changed | (shard_of[members[1:]] != shard_of[members[:-1]])
    sample_of = np.cumsum(new) - 1

    def pick(wanted: list[str]) -> np.ndarray:
        chosen = np.full(int(new.sum()), -1, dtype=np.int64)
        for extension in reversed(wanted):  # the preferred one last, so it wins
            hits = np.flatnonzero(pc.equal(fields, extension).to_numpy(zero_copy_only=False))
            samples, first_hit = np.unique(sample_of[hits], return_index=True)  # a field twice: the first counts
            chosen[samples] = members[hits[first_hit]]
        return chosen

    return Samples(members[new], pick(extensions), pick(["cls"]))


@register
class WebDatasetPool(EncodedImagePool):
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
        shards = map_files(ShardMembers.cached, self.shards, "indexing tar shards")  # a missing shard fails here
        self.versions = [m.version for m in shards]
        self.names = pa.concat_arrays([m.names for m in shards])
        self.member_shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(m.names) for m in shards])
        self.member_offset = np.concatenate([m.offsets for m in shards])
        self.member_size = np.concatenate([m.sizes for m in shards])
        self.file_size = np.array([m.file_size for m in shards], dtype=np.int64)
        self.samples = group_members(self.names, self.member_shard, self.extensions)
        self.open_shards = OpenFiles(OPEN_SHARDS)
        if not len(self.samples.first):
            raise UserError(f"no samples in {len(self.shards)} tar shard(s) ({self.shards[0].name}, ...): "
                            "check the shards option")
        # the last sample of a truncated shard may have lost members to the cut: its errors say so
        shard = self.member_shard[self.samples.first]
        last_of_shard = np.r_[shard[1:] != shard[:-1], True]
        self.cut_short = last_of_shard & np.array([m.truncated for m in shards])[shard]

    def __len__(self) -> int:
        return len(self.samples.first)

    def key(self, index: int) -> str:
        first = int(self.samples.first[index])
        key = _KEY_FIELD_RE.match(self.names[first].as_py()).group(1)
        return f"{self.shards[self.member_shard[first]].basename}/{key}"

    def read_encoded(self, index: int) -> tuple[bytes, int | None]:
        image, cls = int(self.samples.image[index]), int(self.samples.cls[index])
        if image < 0 and self.cut_short[index]:
            raise SampleError("the tar is truncated: this sample's image member is cut off")
        if image < 0:
            raise SampleError(f"no image member ({', '.join(self.extensions)}) in this sample; it has: "
                              f"{', '.join(self._fields(index)) or 'nothing'}")
        data = self._member(image)
        label = None
        if self.labels and cls >= 0:
            text = self._member(cls)
            try:
                label = int(text.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise SampleError(f"cls member is not an integer: {text[:40]!r}") from None
        return data, label

    def _fields(self, index: int) -> list[str]:
        """The field names of sample ``index`` (for its error message)."""
        first = int(self.samples.first[index])
        stop = int(self.samples.first[index + 1]) if index + 1 < len(self) else len(self.names)
        names = self.names.slice(first, stop - first).to_pylist()
        key = _KEY_FIELD_RE.match(names[0]).group(1)
        return [m.group(2) for n in names if (m := _KEY_FIELD_RE.match(n)) and m.group(1) == key]

    def _member(self, number: int) -> bytes:
        """The data of member ``number``, read from its shard (kept open: a reader in order reads on)."""
        shard = int(self.member_shard[number])
        offset, size = int(self.member_offset[number]), int(self.member_size[number])
        if offset + size > self.file_size[shard]:
            raise SampleError(f"the tar is truncated: this member ends at byte {offset + size:,} of "
                              f"{self.file_size[shard]:,}")
        file = self.open_shards.get(shard, self.shards[shard].open)
        data = self.shards[shard].read_at(file, offset, size)
        if len(data) != size:
            raise SampleError(f"the tar is truncated: {len(data):,} of {size:,} bytes of this member")
        return data

    def describe(self) -> dict:
        return {**super().describe(), "shards": len(self.shards), "first": self.shards[0].name,
                "last": self.shards[-1].name, "image": self.extensions, "labels": self.labels,
                "shards_version": digest(self.versions)}
