"""`curate export`: turn a selection into self-contained curated shards the trainer streams.

```
selected/shard-00000.parquet ...  uid, source, pixels, logits, weight, label (+ embedding)
selected/_manifest.json           teacher, image shape, class names, shard counts, provenance
```

(or, with ``--format webdataset``, the same rows as WebDataset tars: curate/selected_tars.py).

Pixels are read back from the original pool and brought to the teacher's input
geometry (channels, size), stored as raw uint8 CHW bytes: the trainer needs
neither the pool nor its decoders. Rows are shuffled (seeded) across shards
before writing, so reading the shards in order is already a mixed stream.
Everything is written into a temporary folder renamed at the end: an
interrupted export leaves no ``selected/`` a trainer could pick up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from curate.atomic import check_new_folder, reserve_space, write_folder_atomically
from curate.errors import UserError
from curate.pools import BatchedPoolDataset, as_is, open_pool, reader_options, reader_workers
from curate.query.config import ExportConfig
from curate.query.scored import ScoredPool
from curate.selected import TARS_FORMAT, ShardWriter, manifest_for, rows_table, shard_schema, write_manifest
from curate.selected_tars import TarShardWriter
from curate.spec import InputSpec
from curate.teachers import file_fingerprint
from curate.vectors import float_lists


@dataclass
class ExportSummary:
    out: Path
    rows: int
    shards: int
    seconds: float


def read_selection(path: Path, scored: ScoredPool) -> tuple[pa.Table, dict[str, Any]]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"cannot read the selection {path} ({err}): give a file written by `curate select`") from None
    if "uid" not in table.column_names:
        raise UserError(f"{path} has no uid column: a selection needs uid (and optionally weight)")
    uid_type = table.schema.field("uid").type
    if not (pa.types.is_string(uid_type) or pa.types.is_large_string(uid_type)):
        raise UserError(f"{path}: uid is {uid_type}, not text: uids are the scored pool's '<source>:<key>' strings")
    weight_type = table.schema.field("weight").type if "weight" in table.column_names else pa.float32()
    if not (pa.types.is_floating(weight_type) or pa.types.is_integer(weight_type)):
        raise UserError(f"{path}: weight is {weight_type}, not a number")
    if "weight" not in table.column_names:
        table = table.append_column("weight", pa.array(np.ones(table.num_rows, dtype=np.float32)))
    weights = table["weight"].cast(pa.float32())
    if weights.null_count or not pc.all(pc.greater(weights, 0)).as_py():
        raise UserError(f"{path}: every weight must be > 0")
    if table.num_rows == 0:
        raise UserError(f"{path} selects nothing: choose a larger --budget or a looser filter")
    if pc.count_distinct(table["uid"]).as_py() != table.num_rows:
        raise UserError(f"{path} lists some uids more than once: give each sample once and use weight for emphasis")
    try:
        provenance = json.loads((table.schema.metadata or {}).get(b"curate", b"{}"))
    except json.JSONDecodeError:
        provenance = None
    if not isinstance(provenance, dict):
        provenance = {}  # not written by `curate select`: nothing to check it against
    made_by = provenance.get("teacher_fingerprint")
    if made_by and made_by != scored.fingerprint:
        raise UserError(f"{path} was selected from scores of another teacher: select again from {scored.folder}")
    return table.select(["uid"]).append_column("weight", weights), provenance


def locate(scored: ScoredPool, pool, selection: pa.Table, with_embedding: bool) -> pa.Table:
    """The selected rows of the scored shards (uid, source, label, logits[, embedding]) with their pool position.

    A scored shard covers pool positions [start, stop); its rows are the readable ones among them, so the
    position of a uid is found by listing the pool's uids over that range (only for shards with a selected row).
    """
    wanted = selection["uid"].combine_chunks()
    columns = ["uid", "source", "label", "logits"] + (["embedding"] if with_embedding else [])
    parts = []
    for path, entry in zip(scored.files, scored.manifest["shards"]):
        table = pq.read_table(path, columns=columns)
        table = table.filter(pc.is_in(table["uid"], value_set=wanted))
        if table.num_rows == 0:
            continue
        positions = {pool.uid(i): i for i in range(entry["start"], entry["stop"])}
        try:
            found = [positions[uid] for uid in table["uid"].to_pylist()]
        except KeyError as err:
            raise UserError(f"the pool at --root has no sample {err.args[0]} that was scored: point --root at the data "
                            "that was scored") from None
        parts.append(table.append_column("position", pa.array(found, pa.int64())))
    rows = pa.concat_tables(parts) if parts else None
    if rows is None or rows.num_rows != selection.num_rows:
        missing = selection.num_rows - (0 if rows is None else rows.num_rows)
        raise UserError(f"{missing:,} uids of the selection are not in {scored.folder}: select again from these scores")
    order = pc.index_in(rows["uid"], value_set=wanted)
    return rows.append_column("weight", selection["weight"].take(order))


PATH_KEYS = {"file", "files", "root", "fonts"}
READ_CHUNK = 128  # pool positions per read task of the export's workers


def without_paths(description: Any) -> Any:
    """A pool description minus where its files live: data may move between scoring and export."""
    if isinstance(description, dict):
        return {k: without_paths(v) for k, v in description.items() if k not in PATH_KEYS}
    if isinstance(description, list):
        return [without_paths(v) for v in description]
    return description


def reopen_pool(scored: ScoredPool, root: Path | None):
    """The scored pool opened again; its kinds, sources and sizes must match what was scored."""
    identity = scored.manifest["identity"]["pool"]
    pool = open_pool(identity["arg"], root, identity["options"])
    described = json.loads(json.dumps(pool.describe(), default=str, sort_keys=True))
    if without_paths(described) != without_paths(identity["description"]):
        raise UserError(f"the pool {identity['arg']} read from --root {root or '(default)'} differs from the one "
                        f"scored (size or sources changed): point --root at the data {scored.folder} was scored from")
    return pool


def verify_images(scored: ScoredPool, images: np.ndarray, stored_logits: np.ndarray) -> None:
    """Run the scoring teacher on a few selected images as read from the pool now and compare with the stored
    logits: a pool whose files changed since scoring (same names and count, other pixels) is caught here."""
    from curate.score.forward import ForwardPass
    from curate.teachers import TEACHER_ONLY, load_teacher

    teacher_path, weights = scored.teacher_source()
    if not (weights or teacher_path).is_file() or not len(images):
        return  # the teacher moved: nothing to compare with (uids and pool size were still checked)
    teacher = load_teacher(teacher_path, flags=TEACHER_ONLY, weights=weights)
    if teacher.fingerprint != scored.fingerprint:
        return
    forward = ForwardPass(teacher, torch.device("cpu"), autocast=False, channels_last=False)
    fresh = forward(torch.from_numpy(np.array(images))).logits.float().numpy()
    relative = np.abs(fresh - stored_logits).max(1) / (np.abs(stored_logits).max(1) + 1e-3)
    if np.median(relative) > 0.05:
        raise UserError(f"the images read from the pool now give other teacher outputs than when scored (median "
                        f"relative difference {np.median(relative):.2f}): point --root at the data that was scored")


def export_selection(cfg: ExportConfig) -> ExportSummary:
    started = time.perf_counter()
    check_new_folder(cfg.out)
    scored = ScoredPool.open(cfg.scored)
    selection, provenance = read_selection(cfg.selection, scored)
    stored_root = scored.manifest.get("pool_root")
    pool = reopen_pool(scored, cfg.root or (Path(stored_root) if stored_root else None))
    rows = locate(scored, pool, selection, cfg.embedding)
    rows = rows.take(pa.array(np.random.default_rng(cfg.seed).permutation(rows.num_rows)))

    spec = InputSpec.from_meta(scored.teacher_meta)
    embedding_dim = rows.schema.field("embedding").type.list_size if cfg.embedding else None
    manifest = manifest_for(scored.fingerprint, scored.teacher_meta, spec, scored.class_names, scored.num_classes)
    if cfg.format == "webdataset":
        manifest["format"] = TARS_FORMAT
    manifest.update({
        "rows": rows.num_rows,
        "weight_sum": float(pc.sum(rows["weight"]).as_py()),
        "shards": [],
        "provenance": {
            "scored": str(scored.folder),
            "selection": str(cfg.selection),
            "selection_sha256": file_fingerprint(cfg.selection),
            "selection_command": provenance.get("command"),
            "selection_hash": provenance.get("hash"),
            "export_command": cfg.command,
            "seed": cfg.seed,
        },
    })
    schema = shard_schema(manifest, embedding_dim)

    def fill(folder: Path) -> None:
        pixels_file = folder / "pixels.tmp.npy"
        pixels = read_pixels(cfg, pool, spec, rows, pixels_file)
        verify = min(cfg.verify, rows.num_rows)
        verify_images(scored, pixels[:verify], float_lists(rows["logits"].slice(0, verify)))
        manifest["shards"] = _write_shards(cfg, rows, pixels, schema, folder)
        del pixels
        pixels_file.unlink()
        write_manifest(folder, manifest)

    write_folder_atomically(cfg.out, fill)
    return ExportSummary(cfg.out, rows.num_rows, len(manifest["shards"]), time.perf_counter() - started)


def read_pixels(cfg: ExportConfig, pool, spec: InputSpec, rows: pa.Table, path: Path) -> np.ndarray:
    """The pixels of ``rows`` (in their shuffled output order) in a memory-mapped array at ``path``.

    The pool is read in its own order, not the shuffled one: sources such as photo patches decode one
    photo per block of neighbouring samples, so random reads would decode a photo per sample. The array
    (fixed size: the teacher's input shape) keeps memory flat whatever the selection's size.
    """
    workers = reader_workers(cfg.workers, pool)
    positions = rows["position"].to_numpy()
    read_order = np.argsort(positions, kind="stable")  # output row of the k-th image read
    pixels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows.num_rows, *spec.shape()))
    reserve_space(path)
    ordered = positions[read_order]
    # Small read chunks, dealt to the workers in turn: where reading costs vary along the pool (a run of photo
    # patches next to a run of cheap glyphs), large chunks leave one worker with most of the work. Neighbouring
    # positions stay together, so a photo is still decoded about once.
    plan = [ordered[start:start + READ_CHUNK] for start in range(0, len(ordered), READ_CHUNK)]
    loader = DataLoader(BatchedPoolDataset(pool, spec.geometry()), sampler=plan, batch_size=None, collate_fn=as_is,
                        **reader_options(workers))
    columns = [TextColumn("[bold]reading the pool"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    done = 0
    with Progress(*columns) as progress:
        task = progress.add_task("read", total=rows.num_rows)
        for batch in loader:
            if batch.errors:
                uid, reason = batch.errors[0][1], batch.errors[0][2]
                raise UserError(f"{uid} was readable when scored but not now ({reason}): the pool changed; "
                                "score it again")
            pixels[read_order[done:done + len(batch.indices)]] = batch.images.numpy()
            done += len(batch.indices)
            progress.advance(task, len(batch.indices))
    return pixels


def _write_shards(cfg: ExportConfig, rows: pa.Table, pixels: np.ndarray, schema: pa.Schema,
                  folder: Path) -> list[dict[str, Any]]:
    tars = TarShardWriter(folder, cfg.shard_rows) if cfg.format == "webdataset" else None
    parquet = ShardWriter(folder, schema, cfg.shard_rows, cfg.row_group_rows) if tars is None else None
    columns = [TextColumn("[bold]writing shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("write", total=rows.num_rows)
        for offset in range(0, rows.num_rows, cfg.row_group_rows):
            part = rows.slice(offset, cfg.row_group_rows)
            images = pixels[offset:offset + part.num_rows]
            if tars is not None:
                tars.write(part, images)
            else:
                parquet.write(rows_table(schema, part["uid"], part["source"], images, part["logits"], part["weight"],
                                         part["label"], part["embedding"] if cfg.embedding else None))
            progress.advance(task, part.num_rows)
    return (tars or parquet).close()
