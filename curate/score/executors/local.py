"""The local executor: DataLoader workers decode the pool, this process runs the teacher."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pyarrow as pa
from torch.utils.data import DataLoader

from curate.device import DeviceFeed
from curate.pools import BatchedPoolDataset, PoolBatch, as_is, reader_options, reader_workers
from curate.score.config import ScoreConfig
from curate.score.executors.base import ScoringJob
from curate.score.forward import BatchScorer, PositionBatches, ScoredBatch


class LocalExecutor:
    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg

    def scored_batches(self, job: ScoringJob) -> Iterator[ScoredBatch]:
        cfg = self.cfg
        scorer = BatchScorer(job.forward, job.reference, job.schema, cfg.batch_size)
        plan = PositionBatches(job.todo, job.read_rows)
        workers = reader_workers(cfg.workers, job.pool)
        device = job.forward.device
        geometry = job.teacher.spec.geometry()
        loader = DataLoader(
            BatchedPoolDataset(job.pool, geometry, cfg.jpegs_on_device(device)),
            sampler=plan,
            batch_size=None,
            collate_fn=as_is,
            pin_memory=device.type == "cuda",
            **reader_options(workers),
        )
        feed = DeviceFeed(loader, lambda batch, to: batch.on_device(to, geometry), device)
        # One batch in flight: batch i+1's pass is queued before batch i's rows are built (on a GPU the two
        # overlap; on the CPU this is the same work in the same order).
        in_flight: tuple | None = None
        for positions, batch in zip(plan, feed):
            launched = (positions, batch, scorer.launch(batch))
            if in_flight is not None:
                yield _scored(*in_flight, cfg.shard_rows)
            in_flight = launched
        if in_flight is not None:
            yield _scored(*in_flight, cfg.shard_rows)


def _scored(positions: range, batch: PoolBatch, rows: Callable[[], pa.RecordBatch | None],
            shard_rows: int) -> ScoredBatch:
    return ScoredBatch(positions[0] // shard_rows, rows(), [(uid, reason) for _, uid, reason in batch.errors],
                       len(positions))
