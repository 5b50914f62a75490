"""The scored-pool folder: shard plan, manifest, atomic files and completion markers.

```
scored/part-00000.parquet ...   one file per shard of --shard-rows pool positions, pool order
scored/_manifest.json            what was scored with what; which shards are complete
scored/_errors.parquet           unreadable samples (uid, error), written when the run completes
scored/_errors/part-*.parquet    the same, per shard, while the run is in progress
```

A shard is streamed into a file under a temporary name and renamed when
complete, then marked complete in the manifest (itself replaced atomically). A rerun skips
shards that are marked complete and present; anything else is recomputed
from scratch, so a kill at any point leaves nothing a reader would take for
finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.atomic import read_json_object, remove_stale_temporaries, temporary_name, write_atomically, write_error
from curate.errors import UserError

FORMAT = "curate.scored/1"
MANIFEST = "_manifest.json"
ERRORS = "_errors.parquet"
ERRORS_DIR = "_errors"
ROW_GROUP_ROWS = 16384
ERROR_SCHEMA = pa.schema([("uid", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first pool position
    stop: int  # one past the last

    @property
    def file(self) -> str:
        return f"part-{self.index:05d}.parquet"


def plan_shards(rows: int, shard_rows: int) -> list[Shard]:
    return [Shard(i, start, min(start + shard_rows, rows)) for i, start in enumerate(range(0, rows, shard_rows))]


def normalized(value: Any) -> Any:
    """JSON round trip: the form an identity takes once stored, so stored and fresh compare equal."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


# Columns with few distinct values. Dictionary-encoding every column (Parquet's default) tripled the writer's
# time (3.1 against 1.1 us a row) and made the files larger: uids, keys and floats are nearly all distinct.
DICTIONARY_COLUMNS = ["source", "label", "pred"]


class ShardStream:
    """One shard streamed to disk: record batches go into an open Parquet writer under a temporary name,
    gathered into row groups of ``ROW_GROUP_ROWS`` so no more than one row group is ever held in memory;
    ``commit`` renames the file into place and marks the shard complete, ``abort`` removes it."""

    def __init__(self, output: ScoredOutput, shard: Shard, schema: pa.Schema) -> None:
        self.output = output
        self.shard = shard
        self.path = output.folder / shard.file
        self.temp = temporary_name(self.path)
        self.rows = 0
        self.buffered: list[pa.RecordBatch] = []
        self.buffered_rows = 0
        try:
            self.writer = pq.ParquetWriter(self.temp, schema, use_dictionary=DICTIONARY_COLUMNS)
        except OSError as err:
            raise write_error(self.path, err) from None

    def write(self, batch: pa.RecordBatch) -> None:
        self.buffered.append(batch)
        self.buffered_rows += batch.num_rows
        if self.buffered_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            try:
                self.writer.write_table(pa.Table.from_batches(self.buffered), row_group_size=ROW_GROUP_ROWS)
            except OSError as err:
                self.abort()
                raise write_error(self.path, err) from None
            self.rows += self.buffered_rows
            self.buffered, self.buffered_rows = [], 0

    def commit(self, errors: list[tuple[str, str]]) -> None:
        self._flush()
        try:
            self.writer.close()
            os.replace(self.temp, self.path)
        except OSError as err:
            self.abort()
            raise write_error(self.path, err) from None
        self.output.commit_shard(self.shard, self.rows, errors)

    def abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass
        self.temp.unlink(missing_ok=True)


class ScoredOutput:
    """The manifest of one ``--out`` folder, created on first use and checked on every rerun."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = {}

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def open(self, identity: dict[str, Any], shards: list[Shard]) -> None:
        """Start a new output or reopen an existing one made from the same identity; refuse anything else."""
        identity = normalized(identity)
        if self.manifest_path.exists():
            existing = read_json_object(self.manifest_path, f"delete {self.folder} and score again")
            if existing.get("format") != FORMAT:
                raise UserError(f"{self.folder} holds something other than a scored pool: choose another --out")
            for part in ("teacher", "pool", "settings"):
                if existing["identity"][part] != identity[part]:
                    what = {"teacher": "another teacher", "pool": "another pool spec",
                            "settings": "other --shard-rows/--batch-size/--limit/--reference-count"}[part]
                    raise UserError(
                        f"{self.folder} was scored with {what}: use a new --out, or delete it to start over"
                    )
            self.manifest = existing
            self.remove_stale_temporaries()
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {self.folder} ({err.strerror}): choose a writable --out") from None
        if not os.access(self.folder, os.W_OK):
            raise UserError(f"{self.folder} is not writable: choose a writable --out")
        self.manifest = {
            "format": FORMAT,
            "code_version": __version__,
            "identity": identity,
            "reference": None,
            "columns": None,
            "shards": [{"file": s.file, "start": s.start, "stop": s.stop, "complete": False} for s in shards],
            "complete": False,
        }
        self.save()

    def note_pool_root(self, root: Path) -> None:
        """Where the pool was read from: not part of the identity (data may move), where `curate export` looks
        by default. Stored with the next save."""
        self.manifest["pool_root"] = str(Path(root).resolve())

    @property
    def reference(self) -> dict[str, Any] | None:
        """The noise reference's statistics (``Reference.to_json``), None until the first run scored it."""
        return self.manifest["reference"]

    def record_reference(self, reference: dict[str, Any], teacher: dict[str, Any]) -> None:
        self.manifest["reference"] = reference
        self.manifest["teacher"] = teacher
        self.save()

    def record_columns(self, names: list[str]) -> None:
        """The shards' column names, stored by the first run."""
        if self.manifest["columns"] is None:
            self.manifest["columns"] = names
            self.save()

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    def save(self) -> None:
        text = json.dumps(self.manifest, indent=1)
        write_atomically(self.manifest_path, lambda p: p.write_text(text))

    def complete_shards(self) -> set[int]:
        """Shards marked complete whose file is there and whole; a damaged one (cut short, overwritten) is
        removed so the run scores it again."""
        done = set()
        for i, entry in enumerate(self.manifest["shards"]):
            path = self.folder / entry["file"]
            if not entry["complete"] or not path.exists():
                continue
            try:
                whole = pq.read_metadata(path).num_rows == entry.get("rows")
            except (OSError, pa.ArrowException):
                whole = False
            if whole:
                done.add(i)
            else:
                path.unlink()
        return done

    def open_shard(self, shard: Shard, schema: pa.Schema) -> ShardStream:
        return ShardStream(self, shard, schema)

    def commit_shard(self, shard: Shard, rows: int, errors: list[tuple[str, str]]) -> None:
        """Called by ``ShardStream.commit`` once the shard is renamed into place: errors, then the manifest marker."""
        errors_dir = self.folder / ERRORS_DIR
        errors_dir.mkdir(exist_ok=True)
        error_table = pa.table({"uid": [u for u, _ in errors], "error": [e for _, e in errors]}, schema=ERROR_SCHEMA)
        write_atomically(errors_dir / shard.file, lambda p: pq.write_table(error_table, p))
        entry = self.manifest["shards"][shard.index]
        entry.update(complete=True, rows=rows, errors=len(errors))
        self.save()

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by killed runs (their pid no longer exists); a live run's are left alone."""
        remove_stale_temporaries(self.folder)
        remove_stale_temporaries(self.folder / ERRORS_DIR)

    def finish(self) -> pa.Table:
        """Gather the per-shard error files into ``_errors.parquet`` and mark the run complete."""
        parts = [pq.read_table(self.folder / ERRORS_DIR / e["file"]) for e in self.manifest["shards"]]
        errors = pa.concat_tables(parts) if parts else ERROR_SCHEMA.empty_table()
        write_atomically(self.folder / ERRORS, lambda p: pq.write_table(errors, p))
        self.manifest["complete"] = True
        self.manifest["rows"] = sum(e.get("rows", 0) for e in self.manifest["shards"])
        self.manifest["errors"] = errors.num_rows
        self.save()
        return errors

    def per_source(self) -> dict[str, dict[str, float]]:
        """Rows, mean relatedness and mean confidence per source, read back shard by shard (memory stays flat)."""
        totals: dict[str, list[float]] = {}
        for entry in self.manifest["shards"]:
            table = pq.read_table(self.folder / entry["file"], columns=["source", "relatedness", "confidence"])
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
