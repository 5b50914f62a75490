"""One writer per run folder: a command that writes ``--out`` holds ``<out>/.lock`` while it runs.

The lock is the kernel's (``flock``), so it dies with its process: a run killed with SIGKILL never leaves a
stale lock behind. The file also holds the holder's pid, for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from curate.atomic import write_error
from curate.errors import UserError

LOCK_FILE = ".lock"

# Descriptors of the locks this process holds. A forked child (a DataLoader worker) inherits them, and the
# lock lives until every copy is closed: a worker outliving its killed parent for a few seconds would keep
# the folder locked. Children close their copies at once; that leaves the parent's lock as it is.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class FolderLock:
    """``with FolderLock(folder):`` creates ``folder`` if needed and holds it, or fails at once in one line."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.folder} is in use by another run (pid {holder}): wait for it to finish, or "
                            "choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last copy of the descriptor releases the lock
            self.fd = None
