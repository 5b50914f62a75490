"""The local executor: DataLoader workers decode the pool, this process runs the teacher."""

from __future__ import annotations

import os
from collections.abc import Iterator

from torch.utils.data import DataLoader

from curate.pools import BatchedPoolDataset, as_is
from curate.score.config import ScoreConfig
from curate.score.executors.base import ScoringJob
from curate.score.forward import BatchScorer, PositionBatches, ScoredBatch


class LocalExecutor:
    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg

    def scored_batches(self, job: ScoringJob) -> Iterator[ScoredBatch]:
        cfg = self.cfg
        scorer = BatchScorer(job.forward, job.reference, job.schema)
        plan = PositionBatches(job.todo, cfg.batch_size)
        workers = cfg.workers if cfg.workers is not None else (0 if job.pool.cheap_to_read else os.cpu_count() or 1)
        loader = DataLoader(
            BatchedPoolDataset(job.pool, job.teacher.spec.geometry()),
            sampler=plan,
            batch_size=None,
            num_workers=workers,
            collate_fn=as_is,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=job.forward.device.type == "cuda",
        )
        for positions, batch in zip(plan, loader):
            yield ScoredBatch(positions[0] // cfg.shard_rows, scorer(batch),
                              [(uid, reason) for _, uid, reason in batch.errors], len(positions))
