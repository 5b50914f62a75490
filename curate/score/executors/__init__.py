"""Scoring executors by name: ``--executor local`` (this machine) or ``ray`` (a Ray actor pool)."""

from __future__ import annotations

from curate.options import one_of
from curate.score.config import ScoreConfig
from curate.score.executors.base import Executor, ScoringJob
from curate.score.executors.local import LocalExecutor
from curate.score.executors.ray_pool import RayExecutor

EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}

__all__ = ["EXECUTORS", "Executor", "ScoringJob", "make_executor"]


def make_executor(cfg: ScoreConfig) -> Executor:
    """The executor ``cfg.executor`` names, ready to run (Ray: connected to its cluster)."""
    one_of(EXECUTORS, executor=cfg.executor)
    return EXECUTORS[cfg.executor](cfg)
