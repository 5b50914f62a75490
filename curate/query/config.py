"""What `curate select` and `curate export` are asked to do: one dataclass each, every default declared here,
checked when built (no DuckDB or FAISS needed to build them)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from curate.errors import UserError
from curate.options import at_least, one_of, positive

STRATEGIES = ("uniform", "topk", "sample", "balanced", "diverse", "knn", "sql")
SELECTION_WEIGHTS = ("uniform", "importance", "class")  # --weights: what each selected row's weight is
RANDOM_STRATEGIES = ("uniform", "sample", "balanced", "diverse")  # those with known inclusion probabilities


@dataclass
class SelectConfig:
    strategy: str
    budget: int
    scored: Path = Path("scored")
    out: Path = Path("selection.parquet")
    where: str | None = None
    by: str = "relatedness"
    tau: float = 1.0
    epsilon: float = 0.1
    weights: str = "uniform"
    dedup: float | None = None
    clusters: int | None = None
    seeds: Path | None = None
    per_seed: int | None = None
    query: str | None = None
    teacher: Path | None = None
    seed: int = 0
    memory_limit: str | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        one_of(STRATEGIES, strategy=self.strategy)
        one_of(SELECTION_WEIGHTS, weights=self.weights)
        if self.weights == "importance" and self.strategy not in RANDOM_STRATEGIES:
            raise UserError(f"--weights importance needs known inclusion probabilities, which {self.strategy} lacks: "
                            f"use one of {', '.join(RANDOM_STRATEGIES)}, or --weights uniform/class")
        at_least(1, budget=self.budget, clusters=self.clusters, per_seed=self.per_seed)
        if self.dedup is not None and not 0 < self.dedup < 1:
            raise UserError(f"--dedup is a cosine similarity threshold in (0, 1), got {self.dedup}")
        positive(tau=self.tau)
        if not 0 <= self.epsilon <= 1:
            raise UserError(f"--epsilon {self.epsilon} is not in [0, 1]: it is the uniform share of the sampling")


EXPORT_FORMATS = ("parquet", "webdataset")


@dataclass
class ExportConfig:
    selection: Path
    scored: Path = Path("scored")
    out: Path = Path("selected")
    root: Path | None = None
    shard_rows: int = 4096
    row_group_rows: int = 1024
    embedding: bool = False
    seed: int = 0
    workers: int | None = None
    verify: int = 256  # rows re-scored by the teacher to check the pool still holds the scored images
    format: str = "parquet"  # or webdataset: tar shards for trainers outside this project
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        one_of(EXPORT_FORMATS, format=self.format)
        at_least(1, shard_rows=self.shard_rows, row_group_rows=self.row_group_rows)
        at_least(0, workers=self.workers, verify=self.verify)
        if self.shard_rows % self.row_group_rows:
            raise UserError(f"--shard-rows {self.shard_rows} is not a multiple of --row-group-rows "
                            f"{self.row_group_rows}: rows per shard come in whole row groups")
