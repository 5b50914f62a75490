"""Streaming the curated shards (`selected/`, opened and checked by curate/selected.py) into training,
exactly resumable.

The order of an epoch is a pure function of (seed, epoch, rank, world size, lanes) and the row counts in
the manifest, computed before any pixel is read:

1. the shards are permuted (seeded by epoch) and dealt to ranks, then to lanes within a rank (one lane
   per DataLoader worker, so a worker mostly reads its own shards);
2. within a lane, windows of ``window_groups`` consecutive row groups are shuffled (a shuffle buffer
   whose contents are known in advance); with ``weighted`` the window is instead drawn with replacement
   in proportion to the ``weight`` column; held-out rows (``held_out_rows``) are left out;
3. lanes are cut into batches and interleaved round-robin (a lane that runs out drops out).

Batch ``k`` of an epoch is therefore known without reading batches ``0..k-1``: resuming at any batch is
exact, whatever the DataLoader does with its workers, and only the row groups a batch touches are read
(each worker keeps the few it is using). The whole set is never in memory; the per-epoch plan holds two
int32 per row of this rank.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from curate.errors import UserError
from curate.selected import CuratedShards, decode_pixels
from curate.vectors import float_lists

HOLDOUT_SEED = 20_161  # not the run's seed: every run on the same shards holds out the same rows


@dataclass
class ReaderState:
    """Where the stream is: ``batch`` batches of ``epoch`` consumed. Saved in checkpoints."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


class EpochPlan:
    """The rows of every batch of one epoch for one rank: (shard, row) pairs, computed from row counts.

    Ranks take equal contiguous ranges of the epoch's row order (shards permuted, each in its row groups'
    order), so any selection of at least one global batch trains on any number of ranks, and a row group is
    read by at most two ranks. Within a rank, shards are dealt to lanes as they come; a rank with fewer than
    ``lanes`` batches of rows uses fewer lanes, so no lane is left empty."""

    def __init__(self, shards: CuratedShards, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world: int = 1, lanes: int = 1, window_groups: int = 8, weighted: bool = False,
                 held_out: np.ndarray | None = None, drop_last: bool = True) -> None:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(shards.files))
        segments = self._rank_segments(shards, order, rank, world)
        mine = list(dict.fromkeys(s for s, _, _ in segments))  # this rank's shards, in order
        lanes = max(1, min(lanes, sum(n for _, _, n in segments) // batch_size))
        offsets = shards.row_offsets
        lane_batches = []
        for lane in range(lanes):
            lane_shards = set(mine[lane::lanes])
            shard_ids, rows = self._lane_rows(shards, [g for g in segments if g[0] in lane_shards], offsets,
                                              window_groups, weighted, held_out,
                                              np.random.default_rng([seed, epoch, rank, lane]))
            count = len(rows) // batch_size if drop_last else -(-len(rows) // batch_size)
            cuts = [slice(i * batch_size, (i + 1) * batch_size) for i in range(count)]
            lane_batches.append([(shard_ids[cut], rows[cut]) for cut in cuts])
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []
        for k in range(max((len(b) for b in lane_batches), default=0)):  # round-robin, exhausted lanes drop out
            self.batches.extend(b[k] for b in lane_batches if k < len(b))

    @staticmethod
    def _rank_segments(shards: CuratedShards, order: np.ndarray, rank: int,
                       world: int) -> list[tuple[int, int, int]]:
        """(shard, first row, rows) pieces of row groups making up rows [rank * N / world, (rank + 1) * N / world)
        of the epoch's order."""
        total = sum(f.rows for f in shards.files)
        lo, hi = rank * total // world, (rank + 1) * total // world
        segments, at = [], 0
        for s in order:
            for start, n in zip(shards.files[s].group_starts, shards.files[s].group_rows):
                first, last = max(at, lo), min(at + n, hi)
                if first < last:
                    segments.append((int(s), int(start) + first - at, last - first))
                at += n
        return segments

    @staticmethod
    def _lane_rows(shards: CuratedShards, groups: list[tuple[int, int, int]], offsets: np.ndarray,
                   window_groups: int, weighted: bool, held_out: np.ndarray | None,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out_shard, out_row = [], []
        for w in range(0, len(groups), window_groups):
            window = groups[w:w + window_groups]
            shard_of = np.concatenate([np.full(n, s, np.int32) for s, _, n in window])
            row_of = np.concatenate([np.arange(start, start + n, dtype=np.int32) for _, start, n in window])
            index = offsets[shard_of] + row_of  # row number across the shards
            if held_out is not None:
                kept = ~held_out[index]
                shard_of, row_of, index = shard_of[kept], row_of[kept], index[kept]
                if not len(row_of):
                    continue
            if weighted:
                p = shards.weights[index].astype(np.float64)
                pick = rng.choice(len(p), size=len(p), replace=True, p=p / p.sum())
            else:
                pick = rng.permutation(len(shard_of))
            out_shard.append(shard_of[pick])
            out_row.append(row_of[pick])
        if not out_shard:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(out_shard), np.concatenate(out_row)

    def __len__(self) -> int:
        return len(self.batches)


class ShardBatches(Dataset):
    """Map-style dataset over the whole stream: item ``(epoch, k)`` is batch ``k`` of that epoch's plan as a
    dict of tensors (pixels uint8 NCHW, logits, weight, label (-1: none), index (row number across the shards
    in manifest order), embedding if asked) plus the key itself.

    One DataLoader serves every epoch (workers are not respawned at epoch boundaries): ``keys`` walks the
    stream from a reader position and each worker builds the plan of the epoch it is asked for. Each worker
    keeps the last few decoded row groups, so consecutive batches of its lane read each row group once.
    """

    def __init__(self, shards: CuratedShards, plan_for: Callable[[int], EpochPlan], with_embedding: bool = False,
                 cached_groups: int = 24) -> None:
        self.shards = shards
        self.plan_for = plan_for
        self.with_embedding = with_embedding
        self.cached_groups = cached_groups
        self._plan: tuple[int, EpochPlan] | None = None
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._group_starts = [f.group_starts for f in shards.files]
        self._offsets = shards.row_offsets

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.plan_for(epoch))
        return self._plan[1]

    def keys(self, start: ReaderState) -> Iterator[tuple[int, int]]:
        """Every (epoch, batch) from ``start`` on, without end: a DataLoader sampler."""
        epoch, batch = start.epoch, start.batch
        while True:
            count = len(self.plan(epoch))
            if count == 0:
                raise UserError("the shards hold fewer rows than one batch per rank and worker: lower --batch-size "
                                "or --workers")
            yield from ((epoch, k) for k in range(batch, count))
            epoch, batch = epoch + 1, 0


    def _group(self, shard: int, group: int) -> dict[str, np.ndarray]:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        columns = ["pixels", "logits", "weight", "label"] + (["embedding"] if self.with_embedding else [])
        try:
            table = pq.ParquetFile(self.shards.files[shard].path).read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"shard {self.shards.files[shard].path} cannot be read ({err}): export it again") from None
        decoded = {
            "pixels": decode_pixels(table["pixels"], self.shards.image_shape, self.shards.files[shard].path),
            "logits": float_lists(table["logits"]),
            "weight": table["weight"].to_numpy().astype(np.float32),
            "label": table["label"].fill_null(-1).to_numpy().astype(np.int64),
        }
        if self.with_embedding:
            decoded["embedding"] = float_lists(table["embedding"])
        self._cache[key] = decoded
        if len(self._cache) > self.cached_groups:
            self._cache.popitem(last=False)
        return decoded

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, k = key
        batch = self.rows(*self.plan(epoch).batches[k])
        batch["key"] = key
        return batch

    def rows(self, shard_ids: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The given (shard, row) pairs, in that order, as a dict of tensors."""
        parts: dict[str, list[np.ndarray]] = {}
        for shard in np.unique(shard_ids):
            in_shard = np.flatnonzero(shard_ids == shard)
            group_starts = self._group_starts[shard]
            group_of = np.searchsorted(group_starts, rows[in_shard], side="right") - 1
            for group in np.unique(group_of):
                take = in_shard[group_of == group]
                decoded = self._group(int(shard), int(group))
                local = rows[take] - group_starts[group]
                for name, values in decoded.items():
                    parts.setdefault(name, []).append(values[local])
                parts.setdefault("index", []).append(self._offsets[shard] + rows[take])
                parts.setdefault("position", []).append(take)
        position = np.argsort(np.concatenate(parts.pop("position")))  # back to the plan's order
        return in_one_buffer({name: np.concatenate(values)[position] for name, values in parts.items()})


def held_out_rows(rows: int, fraction: float) -> np.ndarray | None:
    """Which of ``rows`` rows (manifest order) are held out of training: a fixed draw, the same for every seed,
    recipe and process count, so runs on the same shards are compared on the same held-out rows."""
    if fraction <= 0:
        return None
    return np.random.default_rng(HOLDOUT_SEED).random(rows) < fraction


def held_out_pairs(shards: CuratedShards, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of every held-out row, in manifest order."""
    index = np.flatnonzero(held_out)
    shard = np.searchsorted(shards.row_offsets, index, side="right") - 1
    return shard.astype(np.int32), (index - shards.row_offsets[shard]).astype(np.int32)


def in_one_buffer(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The arrays as tensors that are views of one byte buffer.

    A DataLoader worker hands every tensor storage to the main process as its own shared-memory segment;
    one storage per batch instead of one per field halves the reader's IPC cost, CPU the training step
    would otherwise lose on a small machine.
    """
    sizes = [-(-a.nbytes // 8) * 8 for a in arrays.values()]  # 8-byte aligned, so every dtype can view it
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    tensors, at = {}, 0
    for (name, array), size in zip(arrays.items(), sizes):
        part = buffer[at:at + array.nbytes]
        part.numpy()[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        tensors[name] = part.view(torch.from_numpy(array[:0]).dtype).view(array.shape)
        at += size
    return tensors


def reader_workers(requested: int | None, device: torch.device) -> int:
    """Processes reading shards (``requested`` unless None): none on CPU, where the step uses every core and
    reading in-process costs ~1% of it (benchmarks/train_throughput.py); four on CUDA, to keep the GPU fed."""
    if requested is not None:
        return requested
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
