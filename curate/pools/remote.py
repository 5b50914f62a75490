"""Where crawl-style pools keep their files: local paths or URLs that fsspec opens (``s3://``, ``gs://``,
``https://``), named by a glob, a brace range (``shards-{000000..000999}.tar``) or a list.

Everything a pool needs from storage goes through :class:`Location`: its size and version (the key of cached
indexes), a byte range (one member of a tar, read without scanning it), and a file object to stream.
Credentials come from the environment, as each fsspec backend takes them.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from curate.errors import UserError

T = TypeVar("T")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")
_GLOB = re.compile(r"[*?\[]")
MAX_RANGE = 10_000_000  # a brace range longer than this is a typo, not a crawl
# Which package serves which scheme, for the error a user meets when it is missing.
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp",
             "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


def is_url(name: str) -> bool:
    return bool(_URL.match(name))


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept), ``{x,y}`` -> both, nested
    and combined, in order. The brace syntax of WebDataset shard lists."""
    groups = [m for m in (_RANGE.search(pattern), _ALTERNATIVES.search(pattern)) if m is not None]
    if not groups:
        return [pattern]
    found = min(groups, key=lambda m: m.start())  # the leftmost group varies slowest, as in a shell
    if found.re is _RANGE:
        first, last = found.group(1), found.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        if abs(int(last) - int(first)) >= MAX_RANGE:
            raise UserError(f"{found.group(0)} in {pattern} names more than {MAX_RANGE:,} files: check the range")
        choices = [str(v).zfill(width) for v in range(int(first), int(last) + step, step)]
    else:
        choices = found.group(1).split(",")
    head, tail = pattern[:found.start()], pattern[found.end():]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def _filesystem(name: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or URL; a missing backend is a user error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(name)
    except (ImportError, ValueError) as err:
        scheme = name.split("://", 1)[0] if is_url(name) else "file"
        package = _BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise UserError(f"cannot open {name}: {err}. Install {package} (pip install {package})") from None


@dataclass(frozen=True)
class Location:
    """One file, local or remote. Pickles as its name, and its file system is rebuilt in each process, forked
    ones included: an fsspec http file system carries its parent's event loop, which a child cannot use."""

    name: str

    @property
    def _fs(self) -> tuple[Any, str]:
        return of_this_process(self.__dict__, "_fs", lambda: _filesystem(self.name))

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "name", state["name"])

    @property
    def basename(self) -> str:
        return self.name.rstrip("/").rsplit("/", 1)[-1]

    def info(self) -> dict:
        return self._info

    @cached_property
    def _info(self) -> dict:
        fs, path = self._fs
        with self._storage_errors():
            return fs.info(path)

    @contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """A missing or unreadable file is a one-line error naming it."""
        try:
            yield
        except FileNotFoundError:
            if is_url(self.name):  # fsspec's http reports an unreachable server as a missing file
                raise UserError(f"{self.name} cannot be read (no such file, or the server cannot be reached): "
                                "check the URL") from None
            raise UserError(f"{self.name} does not exist: fix the file list or pattern, or restore the file") from None
        except OSError as err:
            raise UserError(f"cannot read {self.name}: {err}") from None

    def version(self) -> str:
        """Size and modification time (or ETag): what changes when the file does. Keys cached indexes."""
        info = self.info()
        stamp = next((str(info[k]) for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "updated")
                      if info.get(k) is not None), "")
        return hashlib.sha256(f"{self.name}\0{info.get('size')}\0{stamp}".encode()).hexdigest()[:32]

    def open(self) -> io.BufferedIOBase:
        fs, path = self._fs
        with self._storage_errors():
            return fs.open(path, "rb")

    def read_at(self, file: io.BufferedIOBase, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of ``file`` (this location, opened); fewer at the end of a truncated file.
        Storage failing mid-run is a one-line error: the run resumes from its finished shards."""
        try:
            file.seek(offset)
            return file.read(size)
        except (OSError, ValueError) as err:  # fsspec's http raises ValueError where a server ignores ranges
            raise UserError(f"cannot read {self.name} at byte {offset:,}: {err}; a server must answer range "
                            "requests, and the command resumes where it stopped") from None


def of_this_process(state: dict, name: str, build: Callable[[], T]) -> T:
    """``state[name]``, built in this process: a value inherited through ``fork`` (a DataLoader worker) is built
    again, since file offsets and an fsspec http file system's event loop cannot be shared with the parent."""
    pid, value = state.get(name, (None, None))
    if pid != os.getpid():
        value = build()
        state[name] = (os.getpid(), value)
    return value


class OpenFiles:
    """The ``capacity`` files last used, kept open in this process (a reader in order reads on from where it
    was); a forked process starts with none of its parent's, and a pickled copy travels empty."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def get(self, key: Any, open_file: Callable[[], T]) -> T:
        files: OrderedDict = of_this_process(self.__dict__, "_files", OrderedDict)
        if key not in files:
            if len(files) >= self.capacity:
                files.popitem(last=False)[1].close()
            files[key] = open_file()
        files.move_to_end(key)
        return files[key]


def resolve_files(patterns: str | list[str], root: Path | None, what: str, default_glob: str) -> list[Location]:
    """The files named by ``patterns`` (globs, brace ranges, plain names or URLs; relative names under
    ``root``), each pattern's matches sorted, patterns in the order given. Without patterns: ``default_glob``
    under ``root``. A pattern that names nothing is a user error naming it."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        if root is None:
            raise UserError(f"no {what} given: pass --root with a folder of them, or the files option")
        patterns = [default_glob]
    found: list[Location] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            if not is_url(name) and not Path(name).is_absolute() and root is not None:
                name = str(Path(root) / name)
            if _GLOB.search(name):
                matches = _glob(name)
                if not matches:
                    raise UserError(f"no {what} match {name}: fix the pattern or --root")
                found += [Location(m) for m in matches]
            else:
                found.append(Location(name))
    seen: set[str] = set()
    unique = [loc for loc in found if not (loc.name in seen or seen.add(loc.name))]
    return unique


def digest(versions: list[str]) -> str:
    """One short fingerprint of many files' versions: a pool's identity in scored manifests."""
    return hashlib.sha256("\n".join(versions).encode()).hexdigest()[:16]


def map_files(read: Callable[[Location], T], files: list[Location], what: str) -> list[T]:
    """``read`` of every file in order, several at once (remote files spend their time waiting on the
    network), with a progress bar when there are many."""
    from rich.progress import Progress

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as threads, \
            Progress(transient=True, disable=len(files) < 20) as progress:
        task = progress.add_task(what, total=len(files))
        results = []
        for result in threads.map(read, files):
            results.append(result)
            progress.advance(task)
    return results


def _glob(pattern: str) -> list[str]:
    if not is_url(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    fs, path = _filesystem(pattern)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return sorted(f"{protocol}://{p}" if "://" not in p else p for p in fs.glob(path))
