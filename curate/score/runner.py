"""`curate score`: run the teacher once over a pool and write the scored pool (see curate/score/output.py).

The steps, in order: open the pool and the teacher -> plan shards and open (or resume) the output ->
score the noise reference (or reuse the stored one) -> an executor (curate/score/executors) turns the
shards still to score into scored record batches, in pool order -> the writer streams them into Parquet
shards (curate/score/writer.py) -> gather errors and summarise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from curate.device import pick_device
from curate.errors import UserError
from curate.locks import FolderLock
from curate.pools import open_pool
from curate.score.config import ScoreConfig
from curate.score.executors import ScoringJob, make_executor
from curate.score.forward import ForwardPass, score_reference, wants_autocast
from curate.score.output import ScoredOutput, plan_shards
from curate.score.reference import Reference
from curate.score.schema import scored_schema
from curate.score.writer import write_scored
from curate.teachers import Teacher, load_teacher, read_meta_file
from curate.zoo import is_library_name


@dataclass
class ScoreSummary:
    out: Path
    rows: int
    errors: int
    shards_written: int
    shards_skipped: int
    seconds: float
    per_source: dict[str, dict[str, float]]


def score_pool(cfg: ScoreConfig) -> ScoreSummary:
    started = time.perf_counter()
    executor = make_executor(cfg)  # before any work: a missing Ray or an unreachable cluster fails in seconds
    device = pick_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.trust_pickle, read_meta_file(cfg.teacher_meta), device,
                           weights=cfg.teacher_weights)
    pool = open_pool(cfg.pool, cfg.root, cfg.pool_options)
    rows = len(pool) if cfg.limit is None else min(cfg.limit, len(pool))
    if rows == 0:
        raise UserError(f"pool {cfg.pool} has no samples to score: check --pool and --root")
    shards = plan_shards(rows, cfg.shard_rows)

    with FolderLock(cfg.out):  # one run writes a scored folder at a time
        output = ScoredOutput(cfg.out)
        identity = {
            "teacher": {"fingerprint": teacher.fingerprint, "meta": teacher.meta},
            "pool": {"arg": cfg.pool, "options": cfg.pool_options, "description": pool.describe()},
            "settings": {"shard_rows": cfg.shard_rows, "batch_size": cfg.batch_size, "limit": cfg.limit,
                         "reference_count": cfg.reference_count, "seed": cfg.seed, "rows": rows},
        }
        output.open(identity, shards)
        if cfg.root is not None:
            output.note_pool_root(cfg.root)
        done = output.complete_shards()
        todo = [s for s in shards if s.index not in done]

        forward = ForwardPass(teacher, device, wants_autocast(cfg.autocast, device), cfg.channels_last)
        if output.reference is None:
            reference = score_reference(forward, teacher, cfg.reference_count, cfg.seed, cfg.batch_size)
            output.record_reference(reference.to_json(), {
                "path": str(cfg.teacher), "format": teacher.format, "batchnorm_layers": forward.probe.batchnorm_layers,
                "weights": str(teacher.path) if is_library_name(str(cfg.teacher)) else None,
                "indicators": reference.available(), "relatedness": reference.relatedness_terms()})
        reference = Reference.from_json(output.reference)

        metadata = {"format": output.manifest["format"], "teacher_fingerprint": teacher.fingerprint,
                    "class_names": teacher.class_names, "input_spec": teacher.spec.to_meta(),
                    "pool": cfg.pool, "code_version": output.manifest["code_version"]}
        schema = scored_schema(teacher.num_classes, _embedding_dim(forward, teacher), metadata)
        output.record_columns(schema.names)

        if todo:
            job = ScoringJob(cfg, todo, pool, teacher, forward, reference, schema)
            write_scored(output, schema, todo, executor.scored_batches(job))
        errors = output.finish()
        return ScoreSummary(cfg.out, output.rows, errors.num_rows, len(todo), len(shards) - len(todo),
                            time.perf_counter() - started, output.per_source())


def _embedding_dim(forward: ForwardPass, teacher: Teacher) -> int | None:
    scores = forward(torch.zeros(1, *teacher.spec.shape(), dtype=torch.uint8))
    return None if scores.embedding is None else int(scores.embedding.shape[1])
