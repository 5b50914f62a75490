"""The teacher's side of scoring, shared by every executor and by the query stage's spot checks:
normalise and run the probed teacher (``ForwardPass``), turn a decoded pool batch into scored rows
(``BatchScorer``), the batches of pool positions a run is made of (``PositionBatches``, ``rows_per_read``),
and the noise reference that standardises the indicators."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import pyarrow as pa
import torch

from curate.models import channels_last_is_safe
from curate.pools import PoolBatch, read_batch
from curate.pools.generated import NoisePool
from curate.score.indicators import INDICATORS, BatchScores, PendingScores, TeacherProbe
from curate.score.output import Shard
from curate.score.reference import Reference
from curate.score.schema import record_batch
from curate.teachers import Teacher


def wants_autocast(autocast: bool | None, device: torch.device) -> bool:
    """bf16/fp16 autocast: on CUDA unless switched off, on the CPU only when asked for."""
    return device.type == "cuda" if autocast is None else autocast


class ForwardPass:
    """Normalise a uint8 batch on the device and run the probed teacher under inference mode."""

    def __init__(self, teacher: Teacher, device: torch.device, autocast: bool, channels_last: bool) -> None:
        self.model = teacher.model
        compiled = isinstance(self.model, (torch.jit.ScriptModule, torch.fx.GraphModule))
        channels_last = channels_last and (compiled or channels_last_is_safe(self.model, device))
        if channels_last and not compiled:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.probe = TeacherProbe(self.model, torch.zeros(2, *teacher.spec.shape(), device=device))
        self.normalize = teacher.spec.normalize()
        self.device = device
        self.channels_last = channels_last
        dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = torch.autocast(device.type, dtype=dtype) if autocast else nullcontext()

    def __call__(self, images: torch.Tensor) -> BatchScores:
        return self.launch(images).result()

    def launch(self, images: torch.Tensor, call_rows: int | None = None) -> PendingScores:
        """Queue the passes over ``images``, ``call_rows`` at a time (default: all in one); ``.result()`` waits for
        their scores on the host."""
        x = self.normalize(images.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast:
            return self.probe.launch(x, call_rows)


# Rows read, scored and written as one batch, in as many teacher calls of --batch-size as it takes: the reader's
# call, some 20 Arrow arrays, the standardised indicators and the writer's queue are paid once per ~1,024 rows
# instead of once per call (+25% rows/s with a trivial teacher at batch 256 on 2 cores, benchmarks/RESULTS.md;
# the probe's operations stay per call). Capped in bytes so large images (224x224x3: 150 KB each) are read one
# teacher call at a time, as before.
READ_ROWS = 1024
READ_BYTES = 32 * 2**20


def rows_per_read(batch_size: int, image_bytes: int) -> int:
    """Rows of a read batch: a whole number of teacher calls of ``batch_size``, about ``READ_ROWS`` for small
    images, never over ``READ_BYTES`` of pixels unless one call alone is."""
    calls = min(READ_ROWS // batch_size, READ_BYTES // (batch_size * max(1, image_bytes)))
    return batch_size * max(1, calls)


class PositionBatches:
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
    """A decoded pool batch -> its rows in the scored schema (None when no sample of it was readable), the
    teacher called on ``batch_size`` images at a time."""

    def __init__(self, forward: ForwardPass, reference: Reference, schema: pa.Schema, batch_size: int) -> None:
        self.forward = forward
        self.reference = reference
        self.schema = schema
        self.batch_size = batch_size

    def __call__(self, batch: PoolBatch) -> pa.RecordBatch | None:
        return self.launch(batch)()

    def launch(self, batch: PoolBatch) -> Callable[[], pa.RecordBatch | None]:
        """Queue the teacher's passes over ``batch``; the returned function builds its rows once the scores are
        on the host. On a GPU, launching batch i+1 before building batch i's rows keeps the GPU busy while the
        host builds them."""
        if not len(batch.indices):
            return lambda: None
        pending = self.forward.launch(batch.images, self.batch_size)

        def rows() -> pa.RecordBatch:
            scores = pending.result()
            z = self.reference.standardize(scores.indicators)
            return record_batch(self.schema, batch.uids, batch.sources, batch.keys, batch.labels, scores, z,
                                self.reference.relatedness(z))

        return rows


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
    batch = read_batch(pool, range(len(pool)) if indices is None else indices, teacher.spec.geometry())
    if not len(batch.indices):
        return batch, None
    return batch, ForwardPass(teacher, torch.device("cpu"), autocast=False, channels_last=False)(batch.images)


def score_reference(forward: ForwardPass, teacher: Teacher, count: int, seed: int, batch_size: int) -> Reference:
    """Score ``count`` synthetic noise images: the reference every indicator is standardised against."""
    spec = teacher.spec
    noise = NoisePool(count=count, size=spec.image_size, channels=spec.in_channels, seed=seed, name="reference")
    geometry = spec.geometry()
    values: dict[str, list[torch.Tensor]] = {name: [] for name in INDICATORS}
    for start in range(0, count, batch_size):
        scores = forward(read_batch(noise, range(start, min(start + batch_size, count)), geometry).images)
        for name in INDICATORS:
            values[name].append(scores.indicators[name])
    return Reference.fit({name: torch.cat(v) for name, v in values.items()})
