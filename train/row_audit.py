"""``--record-rows``: an audit of the data order, every sample each rank trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from curate.atomic import write_atomically


class RowRecorder:
    """``rows-rank<R>.i64``: (step, epoch, row) int64 triples of every sample this rank trained on; a resumed run
    first drops the records of steps it will redo."""

    def __init__(self, out: Path, rank: int, resume_step: int) -> None:
        self.path = out / f"rows-rank{rank:05d}.i64"
        if self.path.exists():
            kept = np.fromfile(self.path, np.int64).reshape(-1, 3)
            kept = kept[kept[:, 0] < resume_step]
            write_atomically(self.path, kept.tofile)
        self.file = open(self.path, "ab")

    def write(self, step: int, epoch: int, rows: torch.Tensor) -> None:
        n = len(rows)
        np.stack([np.full(n, step), np.full(n, epoch), rows.numpy()], axis=1).astype(np.int64).tofile(self.file)

    def close(self) -> None:
        self.file.close()


def read_recorded_rows(out: Path) -> np.ndarray:
    """Every rank's (step, epoch, row) records of a run with --record-rows, stacked."""
    parts = [np.fromfile(path, np.int64).reshape(-1, 3) for path in sorted(out.glob("rows-rank*.i64"))]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
