"""The one interface every scoring executor implements.

An executor is built from the run's config before any work starts (so a missing Ray or an unreachable
cluster fails in seconds) and turns the shards still to score into ``ScoredBatch``es, in pool order:
batches of ``ScoringJob.read_rows`` positions that never cross a shard boundary (``PositionBatches``), each
scored with a ``BatchScorer`` in teacher calls of ``batch_size`` images. Every executor forms the same batches
and scores them the same way, so their rows are identical and either resumes the other; the writer does not
know which one ran.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from curate.pools import Pool
from curate.score.config import ScoreConfig
from curate.score.forward import ForwardPass, ScoredBatch, rows_per_read
from curate.score.output import Shard
from curate.score.reference import Reference
from curate.teachers import Teacher


@dataclass
class ScoringJob:
    """What is left to score and everything the driver has already set up for it."""

    cfg: ScoreConfig
    todo: list[Shard]  # shards not yet complete, in pool order
    pool: Pool
    teacher: Teacher
    forward: ForwardPass  # the driver's teacher on its device (the local executor scores with it)
    reference: Reference
    schema: pa.Schema

    @property
    def read_rows(self) -> int:
        """Positions per read batch (see ``rows_per_read``)."""
        return rows_per_read(self.cfg.batch_size, math.prod(self.teacher.spec.shape()))


class Executor(Protocol):
    def __init__(self, cfg: ScoreConfig) -> None: ...

    def scored_batches(self, job: ScoringJob) -> Iterator[ScoredBatch]: ...
