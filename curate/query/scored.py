"""A finished scored pool opened for querying: its manifest checked, its shards as DuckDB views.

Views on every connection:

- ``scores``: every row of every shard (the contract's columns). DuckDB's Parquet
  scan reads only the columns a query names, so the wide ``logits`` and
  ``embedding`` lists cost nothing unless asked for.
- ``errors``: the samples scoring could not read (uid, error).
- ``classes``: ``pred`` -> ``class_name``, from the teacher's meta.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq

from curate.atomic import read_json_object
from curate.errors import UserError
from curate.score.output import ERRORS, FORMAT, MANIFEST


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql_file_list(paths: list[Path]) -> str:
    return "[" + ", ".join(sql_string(str(p)) for p in paths) + "]"


@dataclass
class ScoredPool:
    folder: Path
    manifest: dict[str, Any]
    files: list[Path]

    @classmethod
    def open(cls, folder: Path) -> ScoredPool:
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise UserError(f"{folder} is not a scored pool (no {MANIFEST}): run `curate score --out {folder}` first")
        manifest = read_json_object(manifest_path, "score the pool again")
        if manifest.get("format") != FORMAT:
            raise UserError(f"{folder} holds something other than a scored pool ({manifest.get('format')})")
        if not manifest.get("complete"):
            raise UserError(f"scoring of {folder} is not finished: rerun the same `curate score` command to "
                            "complete it")
        files = [folder / entry["file"] for entry in manifest["shards"]]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing[:3])}: rerun `curate score` to rewrite them")
        pool = cls(folder, manifest, files)
        pool.check_teacher()
        return pool

    def check_teacher(self) -> None:
        """Every shard must come from the manifest's teacher: shards copied in from another run are refused."""
        expected = self.fingerprint
        for path in self.files:
            try:
                metadata = pq.read_schema(path).metadata or {}
            except Exception as err:  # pyarrow raises ArrowInvalid/OSError for damaged files
                raise UserError(f"{path} is not a readable Parquet file ({err}): rerun `curate score`") from None
            try:
                found = json.loads(metadata.get(b"curate", b"{}")).get("teacher_fingerprint", "")
            except json.JSONDecodeError:
                found = ""
            if found != expected:
                raise UserError(f"{path.name} was scored by another teacher ({found[:12] or 'unknown'} vs "
                                f"{expected[:12]} in {MANIFEST}): do not mix shards of two runs; score into a "
                                "fresh --out")

    @property
    def fingerprint(self) -> str:
        return self.manifest["identity"]["teacher"]["fingerprint"]

    @property
    def teacher_meta(self) -> dict[str, Any]:
        return self.manifest["identity"]["teacher"]["meta"]

    def teacher_source(self) -> tuple[Path, Path | None]:
        """What scored this pool, to load it again: its model file, or its library name and weights file."""
        teacher = self.manifest.get("teacher", {})
        weights = teacher.get("weights")
        return Path(teacher.get("path", "")), Path(weights) if weights else None

    @property
    def class_names(self) -> list[str]:
        meta = self.teacher_meta
        return list(meta.get("class_names") or [str(i) for i in range(meta["num_classes"])])

    @property
    def num_classes(self) -> int:
        return int(self.teacher_meta["num_classes"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def columns(self) -> list[str]:
        return list(self.manifest["columns"])

    def shard_rows(self) -> list[int]:
        return [int(entry["rows"]) for entry in self.manifest["shards"]]

    def connect(self, memory_limit: str | None = None, threads: int | None = None,
                other_files: tuple[Path, ...] = ()) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with the views above, sealed: it reads this scored folder and the
        ``other_files`` named (a selection to join, the temporary file of `curate sql --out`) and nothing else
        on the machine or the network, installs and loads no extension, and its settings cannot be changed
        back by a query."""
        con = duckdb.connect()
        if memory_limit:
            try:
                con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
            except duckdb.Error as err:
                raise UserError(f"bad --memory-limit {memory_limit!r} ({err}): use a size such as 2GB") from None
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet({sql_file_list(self.files)})")
        errors = self.folder / ERRORS
        con.execute(f"CREATE VIEW errors AS SELECT * FROM read_parquet({sql_string(str(errors))})")
        con.execute("CREATE TABLE classes (pred SMALLINT, class_name VARCHAR)")
        con.executemany("INSERT INTO classes VALUES (?, ?)", list(enumerate(self.class_names)))
        con.execute(f"SET allowed_directories = [{sql_string(str(self.folder.resolve()) + '/')}]")
        if other_files:
            con.execute(f"SET allowed_paths = {sql_file_list([Path(f).resolve() for f in other_files])}")
        for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
            con.execute(f"SET {setting} = false")
        con.execute("SET lock_configuration = true")
        return con
