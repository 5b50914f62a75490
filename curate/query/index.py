"""`curate index`: a FAISS index over the teacher embeddings of a scored pool (cosine similarity).

```
scored/_index/index.faiss     the index; vector ids are row positions in shard order
scored/_index/uids.parquet    uid of every id, in id order
scored/_index/index.json      kind, parameters, rows, teacher fingerprint
```

The kind follows the pool's size: an exact flat index while the vectors fit
``budget_mb`` and the pool is under ``FLAT_MAX_ROWS``; above that IVF-PQ, whose
codes take D/4 bytes a vector, trained on a seeded sample and filled shard by
shard so the float vectors are never all in memory. HNSW is there on request
(``--kind hnsw``): fast and accurate, but it keeps every vector in memory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from curate.atomic import read_json_object, write_folder_atomically
from curate.errors import UserError
from curate.query.scored import ScoredPool
from curate.vectors import float_lists

INDEX_DIR = "_index"
FLAT_MAX_ROWS = 200_000
KINDS = ("auto", "flat", "ivf", "hnsw")


def embeddings_of(batch: pa.RecordBatch | pa.Table, column: str = "embedding") -> np.ndarray:
    """The embedding lists as float32 (rows, D), L2-normalised so inner product is cosine."""
    vectors = float_lists(batch.column(column))
    faiss.normalize_L2(vectors)
    return vectors


def shard_embeddings(scored: ScoredPool, batch_rows: int = 65536,
                     columns: tuple[str, ...] = ("embedding",)) -> Iterator[pa.RecordBatch]:
    """Record batches of the named columns, shard by shard in id order."""
    for path in scored.files:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(columns))


def embedding_dim(scored: ScoredPool) -> int:
    field = pq.read_schema(scored.files[0]).field("embedding") if "embedding" in scored.columns else None
    if field is None:
        raise UserError(f"{scored.folder} has no embedding column (the teacher exposes no penultimate features): "
                        "score with a checkpoint or TorchScript teacher to use the vector index")
    return field.type.list_size


def choose_kind(kind: str, rows: int, dim: int, budget_mb: int) -> str:
    flat_mb = rows * dim * 4 / 2**20
    if kind == "auto":
        return "flat" if rows < FLAT_MAX_ROWS and flat_mb <= budget_mb else "ivf"
    if kind in ("flat", "hnsw") and flat_mb > budget_mb:
        raise UserError(f"a {kind} index keeps all {rows:,} vectors in memory ({flat_mb:,.0f} MiB > --budget-mb "
                        f"{budget_mb}): use --kind ivf or raise --budget-mb")
    return kind


def ivf_parameters(rows: int, dim: int) -> dict[str, int]:
    """nlist ~ 4 sqrt(N) as a power of two, at most 1024: on a few CPU cores, assigning 10M vectors to more
    lists costs minutes while 1024 lists of ~10k codes still answer a query in milliseconds. PQ with D/4
    subquantizers capped at 64 (bytes per vector), 8 bits each, fewer for small pools (FAISS wants 39
    training points per codebook entry)."""
    nlist = int(min(1024, max(16, 2 ** round(math.log2(4 * math.sqrt(rows))))))
    nlist = min(nlist, max(1, rows // 39))  # FAISS wants >= 39 training points per centroid
    subquantizers = max(m for m in range(1, min(64, dim // 4) + 1) if dim % m == 0)
    nbits = int(max(1, min(8, math.log2(max(2, rows // 39)))))
    return {"nlist": nlist, "m": subquantizers, "nbits": nbits, "nprobe": min(nlist, 16)}


def sample_embeddings(scored: ScoredPool, count: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of ``count`` normalised embeddings, read one shard at a time."""
    rng = np.random.default_rng(seed)
    total = scored.rows
    chosen = np.sort(rng.choice(total, size=min(count, total), replace=False))
    parts, offset = [], 0
    for path, rows in zip(scored.files, scored.shard_rows()):
        local = chosen[(chosen >= offset) & (chosen < offset + rows)] - offset
        if len(local):
            table = pq.read_table(path, columns=["embedding"]).take(pa.array(local))
            parts.append(embeddings_of(table))
        offset += rows
    return np.concatenate(parts)


def new_index(kind: str, rows: int, dim: int) -> tuple[faiss.Index, dict[str, Any]]:
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index, {"M": 32, "efConstruction": 80, "efSearch": 64}
    params = ivf_parameters(rows, dim)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
    index.nprobe = params["nprobe"]
    return index, params


@dataclass
class IndexSummary:
    folder: Path
    kind: str
    rows: int
    dim: int
    params: dict[str, Any]
    seconds: float


def build_index(scored: ScoredPool, kind: str = "auto", budget_mb: int = 2048, train_rows: int = 100_000,
                seed: int = 0) -> IndexSummary:
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
    started = time.perf_counter()
    dim = embedding_dim(scored)
    kind = choose_kind(kind, scored.rows, dim, budget_mb)
    index, params = new_index(kind, scored.rows, dim)
    if not index.is_trained:
        index.train(sample_embeddings(scored, max(train_rows, 39 * params["nlist"]), seed))
    with Progress(transient=True) as progress:
        task = progress.add_task(f"indexing ({kind})", total=scored.rows)
        for batch in shard_embeddings(scored):
            index.add(embeddings_of(batch))
            progress.advance(task, batch.num_rows)
    info = {"kind": kind, "rows": scored.rows, "dim": dim, "params": params, "metric": "cosine",
            "teacher_fingerprint": scored.fingerprint, "seed": seed}
    _save(scored, index, info)
    return IndexSummary(scored.folder / INDEX_DIR, kind, scored.rows, dim, params, time.perf_counter() - started)


def _save(scored: ScoredPool, index: faiss.Index, info: dict[str, Any]) -> None:
    """Index, uid order and info into one folder swapped in whole: a reader never sees half an index."""

    def fill(folder: Path) -> None:
        faiss.write_index(index, str(folder / "index.faiss"))
        schema = pa.schema([pa.field("uid", pa.string(), nullable=False)])
        with pq.ParquetWriter(folder / "uids.parquet", schema) as writer:
            for batch in shard_embeddings(scored, columns=("uid",)):
                writer.write_batch(pa.RecordBatch.from_arrays([batch.column(0)], schema=schema))
        (folder / "index.json").write_text(json.dumps(info, indent=1))

    write_folder_atomically(scored.folder / INDEX_DIR, fill)


@dataclass
class VectorIndex:
    index: faiss.Index
    uids: pa.Array
    info: dict[str, Any]

    @classmethod
    def load(cls, scored: ScoredPool) -> VectorIndex:
        folder = scored.folder / INDEX_DIR
        if not (folder / "index.json").exists():
            raise UserError(f"{scored.folder} has no vector index: run `curate index --scored {scored.folder}` first")
        info = read_json_object(folder / "index.json", f"run `curate index --scored {scored.folder}` again")
        if info.get("teacher_fingerprint") != scored.fingerprint or info.get("rows") != scored.rows:
            raise UserError(f"the index in {folder} was built for other scores: run `curate index` again")
        try:
            uids = pq.read_table(folder / "uids.parquet")["uid"].combine_chunks()
            index = faiss.read_index(str(folder / "index.faiss"))
        except Exception as err:  # FAISS raises RuntimeError for anything it cannot parse; pyarrow its own
            raise UserError(f"the index in {folder} is damaged ({type(err).__name__}: {str(err).splitlines()[0]}): "
                            "run `curate index` again") from None
        if index.ntotal != len(uids):
            raise UserError(f"the index in {folder} holds {index.ntotal:,} vectors for {len(uids):,} uids: "
                            "run `curate index` again")
        return cls(index, uids, info)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of the ``k`` nearest rows of each (normalised here) query."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        faiss.normalize_L2(queries)
        return self.index.search(queries, k)
