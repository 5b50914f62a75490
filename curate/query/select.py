"""`curate select`: choose and weight the samples worth distilling on; writes ``selection.parquet``.

Every strategy ranks the candidates (the scored rows passing ``--where``) by a
priority, lowest first, and the selection is the first ``budget`` of them. That
one shape is what lets the steps compose: a SQL filter narrows the candidates,
a strategy ranks them, and ``--dedup`` walks the ranking dropping rows too
close (cosine of teacher embeddings) to one already kept, refilling from
further down the same ranking.

Strategies (all seeded and reproducible):

- ``uniform``: a uniform random sample without replacement.
- ``topk``: the highest values of ``--by`` (a column or SQL expression).
- ``sample``: preferential sampling without replacement, probability
  ``(1 - epsilon) * softmax(by / tau) + epsilon / N`` (Efraimidis-Spirakis keys).
- ``balanced``: equal quotas per teacher-predicted class (classes with fewer
  candidates give their share to the others), each filled by ``--by``.
- ``diverse``: k-means of the embeddings (FAISS), equal quotas per cluster
  filled by ``--by``; near-duplicates dropped (``--dedup``, default 0.98 for ``diverse``).
- ``knn``: nearest neighbours (the vector index) of seed images (``--seeds``
  folder, embedded by the teacher) or of class prototypes (mean embedding of
  the most related rows of every predicted class), quotas spread over seeds.
- ``sql``: any query over ``candidates``/``scores`` returning ``uid`` and
  optionally ``weight``, in the order given.

Weights (``--weights``): ``uniform`` (all 1); ``importance``, 1 / inclusion
probability rescaled to mean 1, so a weighted loss estimates the loss over
all candidates (random and stratified strategies only); ``class``, equal total
weight per teacher-predicted class, so each class is seen equally often.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.atomic import check_writable, write_atomically
from curate.errors import UserError
from curate.query.config import SelectConfig
from curate.query.index import embeddings_of
from curate.query.scored import ScoredPool, sql_string
from curate.query.sql import check_read_only, first_line

CARRIED = ["source", "key", "label", "pred", "confidence", "relatedness"]
FORMAT = "curate.selection/1"


@dataclass
class SelectSummary:
    out: Path
    rows: int
    candidates: int
    per_source: dict[str, int]
    per_class: dict[str, int]
    dropped_duplicates: int


def _uniform_sql(seed: int) -> str:
    """A uniform number in (0, 1) per uid: a hash, so the draw is the same whatever DuckDB's thread count."""
    return f"((hash(uid || ':{int(seed)}') >> 11)::DOUBLE + 0.5) / 9007199254740992.0"


def water_fill(counts: dict[Any, int], budget: int) -> dict[Any, int]:
    """Equal quotas summing to ``budget``; a group with fewer rows than its share gives the rest to the others."""
    quotas = {group: 0 for group in counts}
    open_groups = sorted((g for g in counts if counts[g] > 0), key=lambda g: (counts[g], str(g)))
    left = budget
    while open_groups and left > 0:
        share, extra = divmod(left, len(open_groups))
        smallest = open_groups[0]
        if counts[smallest] - quotas[smallest] <= share:  # the smallest group is exhausted: fill it, go again
            left -= counts[smallest] - quotas[smallest]
            quotas[smallest] = counts[smallest]
            open_groups.pop(0)
            continue
        for i, group in enumerate(sorted(open_groups, key=str)):
            quotas[group] += share + (1 if i < extra else 0)
        left = 0
    return quotas


class Selector:
    """Runs one selection: candidates view -> ranked table -> dedup -> weights -> selection.parquet."""

    def __init__(self, cfg: SelectConfig) -> None:
        self.cfg = cfg
        check_writable(cfg.out)
        self.scored = ScoredPool.open(cfg.scored)
        self.con = self.scored.connect(memory_limit=cfg.memory_limit)
        self.dedup = cfg.dedup if cfg.dedup is not None else (0.98 if cfg.strategy == "diverse" else None)
        self.candidates = 0
        self.clusters: pa.Table | None = None  # diverse: uid -> cluster, registered in DuckDB while in use

    def sql(self, query: str, what: str) -> list[tuple]:
        """Execute ``query`` (``what`` names it in errors) and return its (small) result as rows."""
        try:
            return self.con.execute(query).fetchall()
        except duckdb.Error as err:
            raise UserError(f"{what} failed: {first_line(err)}") from None

    def arrow(self, query: str, what: str) -> pa.Table:
        """The result of ``query`` as an Arrow table (materialised whole: keep it narrow or small)."""
        try:
            return self.con.sql(query).to_arrow_table()
        except duckdb.Error as err:
            raise UserError(f"{what} failed: {first_line(err)}") from None

    def run(self) -> SelectSummary:
        cfg = self.cfg
        where = cfg.where or "TRUE"
        # the filter and the ranking expression are pasted into larger queries: each must be one plain query
        check_read_only(self.con, f"SELECT * FROM scores WHERE {where}")
        check_read_only(self.con, f"SELECT ({cfg.by}) FROM scores")
        self.sql(f"CREATE VIEW candidates AS SELECT * FROM scores WHERE {where}", "--where")
        self.candidates = self.sql("SELECT count(*) FROM candidates", "--where")[0][0]
        if self.candidates == 0:
            raise UserError("no scored row passes --where: loosen the filter")
        if cfg.budget > self.candidates:
            raise UserError(f"--budget {cfg.budget:,} is larger than the {self.candidates:,} candidates: "
                            "lower --budget or loosen --where")
        self.sql(f"SELECT ({cfg.by})::DOUBLE FROM candidates LIMIT 1", "--by")
        ranked = getattr(self, f"rank_{cfg.strategy}")()  # uid, priority, inclusion (probability or NULL)
        selection, dropped = self.take(ranked)
        selection = self.with_weights(selection)
        self.write(selection)
        return SelectSummary(cfg.out, selection.num_rows, self.candidates, _counts(selection, "source"),
                             _counts(selection, "class_name"), dropped)

    # -- strategies: each returns the name of a table (uid, priority, inclusion) --------------------------------

    def _ranked(self, body: str) -> str:
        self.sql(f"CREATE TEMP TABLE ranked AS {body}", f"strategy {self.cfg.strategy}")
        return "ranked"

    def rank_uniform(self) -> str:
        inclusion = self.cfg.budget / self.candidates
        return self._ranked(f"SELECT uid, {_uniform_sql(self.cfg.seed)} AS priority, {inclusion}::DOUBLE AS inclusion "
                            "FROM candidates")

    def rank_topk(self) -> str:
        return self._ranked(f"SELECT uid, -({self.cfg.by})::DOUBLE AS priority, NULL::DOUBLE AS inclusion "
                            "FROM candidates")

    def rank_sample(self) -> str:
        cfg = self.cfg
        n = self.candidates
        return self._ranked(f"""
            WITH scored AS (SELECT uid, ({cfg.by})::DOUBLE / {cfg.tau} AS logit FROM candidates),
                 norm AS (SELECT max(logit) AS top FROM scored),
                 weighted AS (SELECT uid, exp(logit - top) AS w FROM scored, norm),
                 total AS (SELECT sum(w) AS z FROM weighted),
                 prob AS (SELECT uid, {1 - cfg.epsilon} * w / z + {cfg.epsilon} / {n} AS p FROM weighted, total)
            SELECT uid, -ln({_uniform_sql(cfg.seed)}) / p AS priority, least(1.0, {cfg.budget} * p) AS inclusion
            FROM prob""")

    def _quota_ranking(self, group: str, source: str) -> str:
        """Equal quotas per ``group`` value of ``source``, filled in ``--by`` order: priority = rank / quota."""
        counts = dict(self.sql(f"SELECT {group}, count(*) FROM {source} GROUP BY {group}", "grouping"))
        quotas = water_fill(counts, self.cfg.budget)
        self.con.execute("CREATE TEMP TABLE quotas (grp BIGINT, quota BIGINT, available BIGINT)")
        self.con.executemany("INSERT INTO quotas VALUES (?, ?, ?)",
                             [(int(g), quotas[g], counts[g]) for g in counts])
        return self._ranked(f"""
            SELECT s.uid,
                   (row_number() OVER (PARTITION BY s.{group} ORDER BY ({self.cfg.by})::DOUBLE DESC, s.uid) - 0.5)
                       / greatest(q.quota, 1) + CASE WHEN q.quota = 0 THEN 1e9 ELSE 0 END AS priority,
                   q.quota::DOUBLE / q.available AS inclusion
            FROM {source} s JOIN quotas q ON s.{group} = q.grp""")

    def rank_balanced(self) -> str:
        return self._quota_ranking("pred", "candidates")

    def rank_diverse(self) -> str:
        clusters = self.cfg.clusters or int(min(1024, max(2, self.cfg.budget // 32)))
        _, vectors = self.fetch_embeddings("SELECT uid, embedding FROM candidates",
                                              sample=max(100_000, 40 * clusters))
        kmeans = faiss.Kmeans(vectors.shape[1], min(clusters, len(vectors)), niter=20, seed=self.cfg.seed,
                              spherical=True, verbose=False)
        kmeans.train(vectors)
        self.clusters = self.assign_clusters(kmeans.index)  # registered while this selector lives
        self.con.register("cluster_of", self.clusters)
        self.sql("CREATE TEMP VIEW clustered AS SELECT c.*, k.cluster FROM candidates c JOIN cluster_of k USING (uid)",
                 "clustering")
        return self._quota_ranking("cluster", "clustered")

    def rank_knn(self) -> str:
        from curate.query.index import VectorIndex

        index = VectorIndex.load(self.scored)
        seeds = self.seed_embeddings()
        per_seed = self.cfg.per_seed or -(-self.cfg.budget // len(seeds))
        k = min(index.index.ntotal, per_seed * 4 + 16)  # room for rows that --where or dedup drop
        sims, ids = index.search(seeds, k)
        rows = [(index.uids[int(i)].as_py(), rank / per_seed) for row in ids for rank, i in enumerate(row) if i >= 0]
        self.con.execute("CREATE TEMP TABLE neighbours (uid VARCHAR, priority DOUBLE)")
        self.con.executemany("INSERT INTO neighbours VALUES (?, ?)", rows)
        return self._ranked("""SELECT n.uid, min(n.priority) AS priority, NULL::DOUBLE AS inclusion
                               FROM neighbours n SEMI JOIN candidates c USING (uid) GROUP BY n.uid""")

    def rank_sql(self) -> str:
        if not self.cfg.query:
            raise UserError("--strategy sql needs --query \"SELECT uid[, weight] FROM candidates ...\"")
        query = check_read_only(self.con, self.cfg.query)
        columns = self.arrow(f"SELECT * FROM ({query}) LIMIT 0", "--query").column_names
        if "uid" not in columns:
            raise UserError(f"--query must return a uid column (it returns {', '.join(columns)})")
        weight = "weight::DOUBLE" if "weight" in columns else "1.0"
        table = self._ranked(f"""SELECT uid, row_number() OVER ()::DOUBLE AS priority, NULL::DOUBLE AS inclusion,
                                        {weight} AS query_weight FROM ({query})""")
        unknown = self.sql("SELECT count(*) FROM ranked ANTI JOIN scores USING (uid)", "--query")[0][0]
        if unknown:
            raise UserError(f"--query returned {unknown:,} uids that are not in the scored pool")
        repeated = self.sql("SELECT uid, count(*) FROM ranked GROUP BY uid HAVING count(*) > 1 LIMIT 1", "--query")
        if repeated:
            uid, times = repeated[0]
            raise UserError(f"--query returns {uid} {times} times: a selection lists each sample once (SELECT "
                            "DISTINCT), with a weight column for emphasis")
        return table

    # -- helpers ----------------------------------------------------------------------------------------------

    def fetch_embeddings(self, query: str, sample: int | None = None) -> tuple[pa.Array, np.ndarray]:
        """Embeddings of ``query``'s rows; with ``sample``, of a seeded Bernoulli sample of about that many
        (a streaming filter on the uid hash: no sort that would carry every row's embedding)."""
        if sample is not None and self.candidates > sample:
            query = f"{query} WHERE {_uniform_sql(self.cfg.seed + 1)} < {sample / self.candidates}"
        table = self.arrow(query, "reading embeddings")
        return table["uid"], embeddings_of(table)

    def assign_clusters(self, centroids: faiss.Index) -> pa.Table:
        """Nearest centroid of every candidate, one scored shard at a time: the float embeddings of all
        candidates never sit in memory together (DuckDB would materialise a whole result before handing
        it over, 5 GB at 10M x 128)."""
        where = self.cfg.where or "TRUE"
        uids, clusters = [], []
        for path in self.scored.files:
            batch = self.arrow(f"SELECT uid, embedding FROM read_parquet({sql_string(str(path))}) WHERE {where}",
                               "reading embeddings")
            if batch.num_rows:
                _, nearest = centroids.search(embeddings_of(batch), 1)
                uids.append(pa.concat_arrays(batch["uid"].chunks))  # a copy: a slice would pin the embeddings
                clusters.append(pa.array(nearest[:, 0].astype(np.int64)))
        return pa.table({"uid": pa.chunked_array(uids, pa.string()),
                         "cluster": pa.chunked_array(clusters, pa.int64())})

    def seed_embeddings(self) -> np.ndarray:
        if self.cfg.seeds is None:  # class prototypes: mean direction of the 64 most related rows per class
            table = self.arrow(f"""SELECT pred, embedding FROM candidates QUALIFY row_number() OVER
                (PARTITION BY pred ORDER BY ({self.cfg.by})::DOUBLE DESC, uid) <= 64""", "prototypes")
            preds, vectors = table["pred"].to_numpy(), embeddings_of(table)
            return np.stack([vectors[preds == c].mean(0) for c in np.unique(preds)])
        if self.cfg.teacher is not None:
            return embed_seed_images(self.cfg.seeds, self.cfg.teacher)
        return embed_seed_images(self.cfg.seeds, *self.scored.teacher_source())

    def take(self, ranked: str) -> tuple[pa.Table, int]:
        """The first ``budget`` rows by priority; with dedup, walk the ranking dropping near-duplicates."""
        budget = self.cfg.budget
        extra = ", r.query_weight" if self.cfg.strategy == "sql" else ""
        columns = ", ".join(f"c.{name}" for name in CARRIED)
        base = f"""SELECT r.uid, r.priority, r.inclusion{extra}, {columns}, k.class_name
                   FROM {ranked} r JOIN candidates c USING (uid) LEFT JOIN classes k ON c.pred = k.pred
                   ORDER BY r.priority, r.uid"""
        if self.dedup is None:
            return self.arrow(f"{base} LIMIT {budget}", "selection"), 0
        kept_rows: list[pa.Table] = []
        kept = faiss.IndexFlatIP(self.embedding_dim())
        dropped, offset, chunk = 0, 0, max(1024, budget)
        while kept.ntotal < budget:
            table = self.arrow(f"""SELECT b.*, c.embedding FROM ({base} LIMIT {chunk} OFFSET {offset}) b
                                  JOIN candidates c USING (uid) ORDER BY b.priority, b.uid""", "dedup")
            if table.num_rows == 0:
                break
            keep, examined = dedup_mask(embeddings_of(table), kept, self.dedup, budget - kept.ntotal)
            dropped += examined - int(keep.sum())
            kept_rows.append(table.filter(pa.array(keep)).drop_columns(["embedding"]))
            offset += chunk
        return pa.concat_tables(kept_rows), dropped

    def embedding_dim(self) -> int:
        from curate.query.index import embedding_dim

        return embedding_dim(self.scored)

    def with_weights(self, selection: pa.Table) -> pa.Table:
        n = selection.num_rows
        if self.cfg.weights == "importance":
            raw = 1.0 / selection["inclusion"].to_numpy(zero_copy_only=False)
        elif self.cfg.weights == "class":
            preds = selection["pred"].to_numpy(zero_copy_only=False)
            classes, inverse, sizes = np.unique(preds, return_inverse=True, return_counts=True)
            raw = 1.0 / sizes[inverse]
        elif self.cfg.strategy == "sql":
            raw = selection["query_weight"].to_numpy(zero_copy_only=False)
            if not (raw > 0).all():
                raise UserError("--query returned weights that are not all > 0")
        else:
            raw = np.ones(n)
        weights = raw * (n / raw.sum())  # mean 1: the loss scale does not depend on the weighting
        drop = [c for c in ("inclusion", "query_weight") if c in selection.column_names]
        selection = selection.drop_columns(drop)
        return selection.add_column(1, "weight", pa.array(weights.astype(np.float32)))

    def write(self, selection: pa.Table) -> None:
        provenance = {"format": FORMAT, "command": self.cfg.command,
                      "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()
                                 if k != "command"},
                      "scored": str(self.scored.folder), "teacher_fingerprint": self.scored.fingerprint,
                      "candidates": self.candidates, "pool_rows": self.scored.rows}
        provenance["hash"] = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()
        table = selection.replace_schema_metadata({"curate": json.dumps(provenance)})
        self.cfg.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cfg.out, lambda path: pq.write_table(table, path))


def dedup_mask(vectors: np.ndarray, kept: faiss.IndexFlatIP, threshold: float,
               room: int) -> tuple[np.ndarray, int]:
    """Greedy, in order: keep a row unless it is within ``threshold`` cosine of a row kept before it.
    Kept rows are added to ``kept``; stops after ``room`` rows. Returns the mask and how many rows were looked at."""
    keep = np.zeros(len(vectors), dtype=bool)
    if kept.ntotal:
        sims, _ = kept.search(vectors, 1)
        fresh = sims[:, 0] <= threshold
    else:
        fresh = np.ones(len(vectors), dtype=bool)
    similar = vectors @ vectors.T > threshold
    chosen: list[int] = []
    examined = len(vectors)
    for i in range(len(vectors)):
        if len(chosen) == room:
            examined = i
            break
        if fresh[i] and (not chosen or not similar[i, chosen].any()):
            chosen.append(i)
    keep[chosen] = True
    kept.add(vectors[keep])
    return keep, examined


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names or table.num_rows == 0:
        return {}
    values = table[column].cast(pa.string()).fill_null("?")
    counted = pc.value_counts(values)
    return {str(item["values"]): int(item["counts"]) for item in counted.to_pylist()}


def embed_seed_images(folder: Path, teacher_path: Path, weights: Path | None = None) -> np.ndarray:
    """Penultimate embeddings of the images in ``folder``, by the teacher that scored the pool."""
    from curate.pools import open_pool
    from curate.pools.images import list_images
    from curate.score.forward import score_samples
    from curate.teachers import TEACHER_ONLY, load_teacher

    if not (weights or Path(teacher_path)).exists():
        raise UserError(f"the teacher {weights or teacher_path} is gone: pass --teacher to embed the --seeds images")
    if not Path(folder).is_dir() or not list_images(Path(folder)):
        raise UserError(f"no JPEG/PNG/WebP images in {folder}: give --seeds a folder of seed images")
    teacher = load_teacher(Path(teacher_path), flags=TEACHER_ONLY, weights=weights)
    pool = open_pool("folder", Path(folder), {})
    _, scores = score_samples(teacher, pool)
    if scores is None:
        raise UserError(f"none of the images in {folder} can be read")
    if scores.embedding is None:
        raise UserError("this teacher exposes no embedding: knn needs a checkpoint or TorchScript teacher")
    return scores.embedding.float().numpy()
