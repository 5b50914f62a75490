"""Files and folders that appear whole or not at all: written under a temporary name, then renamed.

Temporary names start with a dot and end with ``.tmp-<pid>``: readers skip them, and a later run can tell a
dead run's leftovers (pid gone) from a live one's.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.errors import UserError


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_error(path: Path, err: OSError) -> UserError:
    fix = "free disk space or choose another --out" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "choose a writable --out"
    return UserError(f"cannot write {path} ({err.strerror or err}): {fix}")


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a manifest); bad JSON, bytes that are not text or any other JSON value is
    a one-line error ending with ``fix``."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}): {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (a JSON {type(value).__name__}, not an object): {fix}")
    return value


def check_writable(path: Path) -> None:
    """Fail before any work, in one line, when the file ``path`` could not be written: its folder is created if
    missing and must take a new file (a read-only filesystem, a file where a folder should be)."""
    folder = Path(path).parent
    probe = folder / f".write-check.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise write_error(path, err) from None


def check_new_folder(path: Path) -> None:
    """Fail before any work when ``path``, a folder a command fills whole, holds anything already or could not be
    written (see ``check_writable``)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not an empty folder: choose a new --out or delete it")
    check_writable(path)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str | None = None) -> None:
    """Temporary files and folders in ``folder`` left by killed runs (their pid no longer exists), for the
    target ``name`` (default: any); a live run's are left alone."""
    name = "*" if name is None else glob.escape(name)
    for path in [*Path(folder).glob(f".{name}.tmp-*"), *Path(folder).glob(f".{name}.old-*")]:
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_exists(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def reserve_space(path: Path) -> None:
    """Give a sparse file (a fresh memory map) its disk blocks now: writing through a map into a hole on a full
    disk kills the process with SIGBUS, where reserving raises ENOSPC, which becomes a one-line error."""
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def write_atomically(path: Path, write: Any) -> None:
    """Call ``write(temp_path)``, then rename over ``path``; on failure leave no file behind."""
    remove_stale_temporaries(path.parent, path.name)
    temp = temporary_name(path)
    try:
        write(temp)
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_folder_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(temp_folder)``, then swap the folder in for ``path`` (replacing an older one)."""
    remove_stale_temporaries(path.parent, path.name)
    temp = temporary_name(path)
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir(parents=True)
        fill(temp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old)
        os.replace(temp, path)
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        raise write_error(path, err) from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
