"""`curate score`: run the teacher once over a pool and write the scored pool (see curate/score/output.py).

The steps, in order: open the pool and the teacher -> plan shards and open
(or resume) the output -> score the noise reference (or reuse the stored one)
-> an executor turns the remaining shards into scored record batches, in pool
order -> a writer thread encodes them into Parquet shards -> gather errors
and summarise.

Executors: ``local`` decodes in DataLoader workers and runs the teacher on
this process's device; ``ray`` runs the teacher in a Ray actor pool
(curate/score/ray_executor.py). Both form the same batches (never crossing a
shard boundary, ``batch_size`` positions each) and score them with the same
``BatchScorer``, so their rows are identical and either can resume the other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from curate.device import pick_device
from curate.models import channels_last_is_safe
from curate.errors import UserError
from curate.pools import PoolBatch, PoolDataset, collate_samples, open_pool
from curate.pools.generated import NoisePool
from curate.score.indicators import INDICATORS, BatchScores, TeacherProbe
from curate.score.output import ScoredOutput, Shard, ShardFile, plan_shards
from curate.score.reference import Reference
from curate.score.schema import record_batch, scored_schema
from curate.teachers import Teacher, load_teacher, read_meta_file


@dataclass
class ScoreConfig:
    teacher: Path
    pool: str
    out: Path
    root: Path | None = None
    pool_options: dict = field(default_factory=dict)
    teacher_meta: Path | None = None
    trust_pickle: bool = False
    batch_size: int = 256
    workers: int | None = None  # None: none for array-backed pools, one per core for decoded ones
    shard_rows: int = 65536
    limit: int | None = None
    device: str = "auto"
    autocast: bool | None = None  # None: on CUDA only
    channels_last: bool = True
    reference_count: int = 2048
    seed: int = 0
    executor: str = "local"  # local | ray: where the teacher runs; not part of the output's identity
    address: str | None = None  # ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray)
    num_actors: int | None = None  # ray: teachers running at once (default: one per GPU, else one per CPU)


EXECUTORS = ("local", "ray")


@dataclass
class ScoreSummary:
    out: Path
    rows: int
    errors: int
    shards_written: int
    shards_skipped: int
    seconds: float
    per_source: dict[str, dict[str, float]]


class ForwardPass:
    """Normalise a uint8 batch on the device and run the probed teacher under inference mode."""

    def __init__(self, teacher: Teacher, device: torch.device, autocast: bool, channels_last: bool) -> None:
        self.model = teacher.model
        compiled = isinstance(self.model, (torch.jit.ScriptModule, torch.fx.GraphModule))
        channels_last = channels_last and (compiled or channels_last_is_safe(self.model, device))
        if channels_last and not compiled:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.probe = TeacherProbe(self.model)
        self.normalize = teacher.spec.normalize()
        self.device = device
        self.channels_last = channels_last
        dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = torch.autocast(device.type, dtype=dtype) if autocast else nullcontext()

    def __call__(self, images: torch.Tensor):
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast:
            return self.probe(x)


class ShardBatches:
    """Batches of pool positions that never cross a shard boundary, so a resumed run forms the same batches.
    Ranges made on the fly: a plan of a billion rows costs nothing to hold."""

    def __init__(self, shards: list[Shard], batch_size: int) -> None:
        self.shards = shards
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[range]:
        for shard in self.shards:
            for start in range(shard.start, shard.stop, self.batch_size):
                yield range(start, min(start + self.batch_size, shard.stop))

    def __len__(self) -> int:
        return sum(-(-(s.stop - s.start) // self.batch_size) for s in self.shards)


class BatchScorer:
    """A decoded pool batch -> its rows in the scored schema (None when no sample of it was readable)."""

    def __init__(self, forward: ForwardPass, reference: Reference, schema: pa.Schema) -> None:
        self.forward = forward
        self.reference = reference
        self.schema = schema

    def __call__(self, batch: PoolBatch) -> pa.RecordBatch | None:
        if not len(batch.indices):
            return None
        scores = self.forward(batch.images)
        z = self.reference.standardize(scores.indicators)
        return record_batch(self.schema, batch.uids, batch.sources, batch.keys, batch.labels, scores, z,
                            self.reference.relatedness(z))


@dataclass
class ScoredBatch:
    """What an executor hands the writer: the rows of one batch of ``shard`` and its unreadable samples."""

    shard: int
    rows: pa.RecordBatch | None
    errors: list[tuple[str, str]]  # (uid, reason)
    samples: int  # pool positions covered, readable or not


def score_samples(teacher: Teacher, pool, indices=None) -> tuple[PoolBatch, BatchScores | None]:
    """Read a handful of samples (all of ``pool`` by default) in the teacher's geometry and score them in one
    CPU batch, outside a scoring run: seed images, spot checks. Scores are None when none could be read."""
    dataset = PoolDataset(pool, teacher.spec.geometry(), indices)
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    if not len(batch.indices):
        return batch, None
    return batch, ForwardPass(teacher, torch.device("cpu"), autocast=False, channels_last=False)(batch.images)


def score_reference(forward: ForwardPass, teacher: Teacher, count: int, seed: int, batch_size: int) -> Reference:
    spec = teacher.spec
    noise = NoisePool(count=count, size=spec.image_size, channels=spec.in_channels, seed=seed, name="reference")
    loader = DataLoader(PoolDataset(noise, spec.geometry()), batch_size=batch_size, collate_fn=collate_samples)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in INDICATORS}
    for batch in loader:
        scores = forward(batch.images)
        for name in INDICATORS:
            values[name].append(scores.indicators[name])
    return Reference.fit({name: torch.cat(v) for name, v in values.items()})


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap back to the OS. glibc keeps it in per-thread arenas and Arrow's mimalloc pool keeps
    its own; over a long run the writer thread's buffers made RSS creep up (1.29 GB at 100k rows, 1.82 GB
    at 1M, before this was called after each shard)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ShardWriterThread:
    """Streams record batches into shard files (Parquet encoding, rename, manifest) off the main thread."""

    def __init__(self, output: ScoredOutput, schema: pa.Schema, queued_batches: int = 64) -> None:
        self.output = output
        self.schema = schema
        self.queue: queue.Queue = queue.Queue(maxsize=queued_batches)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        file: ShardFile | None = None
        while (item := self.queue.get()) is not None:
            if self.failure is not None:
                continue  # drain until close() so the main thread never blocks on a full queue
            op, value = item
            try:
                if op == "open":
                    file = self.output.open_shard(value, self.schema)
                elif op == "batch":
                    file.write(value)
                else:
                    file.commit(value)
                    file = None
                    release_freed_memory()
            except BaseException as err:  # handed to the main thread, which re-raises it
                self.failure = err
                if file is not None:
                    file.abort()
                    file = None
            del item
        if file is not None:  # interrupted mid-shard: leave no temporary behind
            file.abort()

    def _put(self, op: str, value) -> None:
        self.check()
        self.queue.put((op, value))

    def open(self, shard: Shard) -> None:
        self._put("open", shard)

    def write(self, batch: pa.RecordBatch) -> None:
        self._put("batch", batch)

    def commit(self, errors: list[tuple[str, str]]) -> None:
        self._put("commit", errors)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.check()


def score_pool(cfg: ScoreConfig) -> ScoreSummary:
    started = time.perf_counter()
    if cfg.executor not in EXECUTORS:
        raise UserError(f"unknown --executor {cfg.executor!r}: choose one of {', '.join(EXECUTORS)}")
    if cfg.executor == "ray":  # before any work: a missing Ray or an unreachable cluster fails in seconds
        from curate.score.ray_executor import connect

        connect(cfg.address)
    device = pick_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.trust_pickle, read_meta_file(cfg.teacher_meta), device)
    pool = open_pool(cfg.pool, cfg.root, cfg.pool_options)
    rows = len(pool) if cfg.limit is None else min(cfg.limit, len(pool))
    if rows == 0:
        raise UserError(f"pool {cfg.pool} has no samples to score: check --pool and --root")
    shards = plan_shards(rows, cfg.shard_rows)

    output = ScoredOutput(cfg.out)
    identity = {
        "teacher": {"fingerprint": teacher.fingerprint, "meta": teacher.meta},
        "pool": {"arg": cfg.pool, "options": cfg.pool_options, "description": pool.describe()},
        "settings": {"shard_rows": cfg.shard_rows, "batch_size": cfg.batch_size, "limit": cfg.limit,
                     "reference_count": cfg.reference_count, "seed": cfg.seed, "rows": rows},
    }
    output.open(identity, shards)
    if cfg.root is not None:  # not part of the identity (data may move); where `curate export` looks by default
        output.manifest["pool_root"] = str(Path(cfg.root).resolve())
    done = output.complete_shards()
    todo = [s for s in shards if s.index not in done]

    forward = ForwardPass(teacher, device, wants_autocast(cfg, device), cfg.channels_last)
    if output.manifest["reference"] is None:
        reference = score_reference(forward, teacher, cfg.reference_count, cfg.seed, cfg.batch_size)
        output.manifest["reference"] = reference.to_json()
        output.manifest["teacher"] = {"path": str(cfg.teacher), "format": teacher.format,
                                      "batchnorm_layers": forward.probe.batchnorm_layers,
                                      "indicators": reference.available(),
                                      "relatedness": reference.relatedness_terms()}
        output.save()
    reference = Reference.from_json(output.manifest["reference"])

    embedding_dim = _embedding_dim(forward, teacher)
    metadata = {"format": output.manifest["format"], "teacher_fingerprint": teacher.fingerprint,
                "class_names": teacher.class_names, "input_spec": teacher.spec.to_meta(),
                "pool": cfg.pool, "code_version": output.manifest["code_version"]}
    schema = scored_schema(teacher.num_classes, embedding_dim, metadata)
    if output.manifest["columns"] is None:
        output.manifest["columns"] = schema.names
        output.save()

    if todo:
        if cfg.executor == "ray":
            from curate.score.ray_executor import ray_scored_batches

            batches = ray_scored_batches(cfg, todo, teacher.fingerprint, reference, schema)
        else:
            batches = local_scored_batches(cfg, pool, teacher, BatchScorer(forward, reference, schema), todo)
        write_scored(output, schema, todo, batches)
    errors = output.finish()
    return ScoreSummary(cfg.out, output.manifest["rows"], errors.num_rows, len(todo), len(shards) - len(todo),
                        time.perf_counter() - started, _per_source(output))


def wants_autocast(cfg: ScoreConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.autocast is None else cfg.autocast


def _embedding_dim(forward: ForwardPass, teacher: Teacher) -> int | None:
    scores = forward(torch.zeros(1, *teacher.spec.shape(), dtype=torch.uint8))
    return None if scores.embedding is None else int(scores.embedding.shape[1])


def local_scored_batches(cfg: ScoreConfig, pool, teacher: Teacher, scorer: BatchScorer,
                         todo: list[Shard]) -> Iterator[ScoredBatch]:
    """The local executor: DataLoader workers decode, this process runs the teacher."""
    plan = ShardBatches(todo, cfg.batch_size)
    workers = cfg.workers if cfg.workers is not None else (0 if pool.cheap_to_read else os.cpu_count() or 1)
    loader = DataLoader(
        PoolDataset(pool, teacher.spec.geometry()),
        batch_sampler=plan,
        num_workers=workers,
        collate_fn=collate_samples,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=scorer.forward.device.type == "cuda",
    )
    for positions, batch in zip(plan, loader):
        yield ScoredBatch(positions[0] // cfg.shard_rows, scorer(batch),
                          [(uid, reason) for _, uid, reason in batch.errors], len(positions))


def write_scored(output: ScoredOutput, schema: pa.Schema, todo: list[Shard], batches: Iterable[ScoredBatch]) -> None:
    """Stream scored batches, in pool order, into the shards of ``todo``; a shard is committed when the
    batches move past it, so an interrupted run keeps every shard it finished."""
    shard_of = {s.index: s for s in todo}
    writer = ShardWriterThread(output, schema)
    current: int | None = None
    errors: list[tuple[str, str]] = []
    total = sum(s.stop - s.start for s in todo)
    columns = [TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    start = time.perf_counter()
    seen = 0
    try:
        with Progress(*columns) as progress:
            task = progress.add_task("score", total=total, rate="")
            for batch in batches:
                if batch.shard != current:
                    if current is not None:
                        writer.commit(errors)
                        errors = []
                    writer.open(shard_of[batch.shard])
                    current = batch.shard
                errors.extend(batch.errors)
                if batch.rows is not None:
                    writer.write(batch.rows)
                seen += batch.samples
                rate = seen / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=batch.samples, rate=f"{rate:,.0f} img/s")
            if current is not None:
                writer.commit(errors)
    finally:
        writer.close()


def _per_source(output: ScoredOutput) -> dict[str, dict[str, float]]:
    """Rows, mean relatedness and mean confidence per source, read back shard by shard (memory stays flat)."""
    totals: dict[str, list[float]] = {}
    for entry in output.manifest["shards"]:
        table = pq.read_table(output.folder / entry["file"], columns=["source", "relatedness", "confidence"])
        table = table.set_column(0, "source", table["source"].cast(pa.string()))
        grouped = table.group_by("source").aggregate([("relatedness", "sum"), ("confidence", "sum"),
                                                      ("source", "count")])
        for row in grouped.to_pylist():
            total = totals.setdefault(row["source"], [0, 0.0, 0.0])
            total[0] += row["source_count"]
            total[1] += row["relatedness_sum"]
            total[2] += row["confidence_sum"]
    return {source: {"rows": rows, "relatedness": related / rows, "confidence": confident / rows}
            for source, (rows, related, confident) in totals.items()}
