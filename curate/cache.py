"""The user's cache of derived files: ``$XDG_CACHE_HOME/curate`` (default ``~/.cache/curate``).

Everything here can be made again from its source: an unreadable or missing entry is made again, and a cache
that cannot be written is skipped (the work is then repeated next time).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from curate.atomic import temporary_name
from curate.errors import UserError

ARRAYS_GIB = 4.0  # default bound of the array cache; $CURATE_CACHE_GIB sets another (0 turns it off)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "curate"


def file_version(path: Path) -> str:
    """What identifies a file's content cheaply: where it is, its size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def array_cache_bytes() -> int:
    """The array cache's bound from ``$CURATE_CACHE_GIB``; pools that use the cache call this when they open, so a
    bad value fails there, before any work."""
    value = os.environ.get("CURATE_CACHE_GIB", str(ARRAYS_GIB))
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not 0 <= gib < float("inf"):
        raise UserError(f"CURATE_CACHE_GIB={value!r} is not a size in GiB: set a number such as 4, or 0 to turn "
                        "the cache off")
    return int(gib * 2**30)


def cached_array(kind: str, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    """The uint8 array ``make()`` returns for ``key``, kept in ``<cache>/<kind>/`` as ``.npy``: a key names its
    array's whole recipe (source file versions, parameters, library versions), so an entry never goes stale,
    it only stops being asked for. The least recently used entries go once the folder holds more than
    ``$CURATE_CACHE_GIB`` (default 4)."""
    limit = array_cache_bytes()
    folder = cache_dir() / kind
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"
    if limit:
        try:
            array = np.load(path, allow_pickle=False)
            if array.dtype == np.uint8:
                os.utime(path)  # used now: trimmed last
                return array
        except (OSError, ValueError):
            pass  # absent, half-trimmed by another process, or unreadable: made again
    array = make()
    if limit and array.nbytes <= limit:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temp = temporary_name(path)
            with open(temp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(temp, path)
            trim(folder, limit)
        except OSError:
            pass
    return array


def trim(folder: Path, limit: int) -> None:
    """Delete the least recently used ``.npy`` files of ``folder`` until the rest fit in ``limit`` bytes."""
    entries = []
    for entry in os.scandir(folder):
        if entry.name.endswith(".npy"):
            try:
                stat = entry.stat()
            except OSError:
                continue  # trimmed by another process meanwhile
            entries.append((stat.st_mtime_ns, stat.st_size, entry.path))
    total = sum(size for _, size, _ in entries)
    for _, size, name in sorted(entries):
        if total <= limit:
            break
        Path(name).unlink(missing_ok=True)
        total -= size
