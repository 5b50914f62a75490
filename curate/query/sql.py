"""`curate sql`: read-only DuckDB queries over a scored pool, printed or written to a file."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from curate.atomic import write_atomically
from curate.errors import UserError
from curate.query.scored import sql_string

# Named queries users can run as they are (`curate sql --example NAME`) or copy and adapt (`--list-examples`).
EXAMPLES: dict[str, tuple[str, str]] = {
    "per-source": (
        "rows, relatedness and confidence per source",
        """SELECT source, count(*) AS rows,
       round(avg(relatedness::DOUBLE), 2) AS mean_relatedness,
       round(quantile_cont(relatedness, 0.9), 2) AS p90_relatedness,
       round(avg(confidence::DOUBLE), 3) AS mean_confidence
FROM scores GROUP BY source ORDER BY mean_relatedness DESC""",
    ),
    "per-class": (
        "rows and relatedness per predicted class, by name",
        """SELECT s.pred, c.class_name, count(*) AS rows,
       round(avg(s.relatedness::DOUBLE), 2) AS mean_relatedness,
       round(avg(s.confidence::DOUBLE), 3) AS mean_confidence
FROM scores s JOIN classes c USING (pred)
GROUP BY s.pred, c.class_name ORDER BY s.pred""",
    ),
    "top-per-class": (
        "the 5 most related samples of every predicted class",
        """SELECT c.class_name, s.uid, s.source, round(s.relatedness::DOUBLE, 2) AS relatedness,
       round(s.confidence::DOUBLE, 3) AS confidence
FROM scores s JOIN classes c USING (pred)
QUALIFY row_number() OVER (PARTITION BY s.pred ORDER BY s.relatedness DESC, s.uid) <= 5
ORDER BY s.pred, s.relatedness DESC""",
    ),
    "source-by-class": (
        "how each source spreads over the teacher's predicted classes",
        """SELECT s.source, c.class_name, count(*) AS rows,
       round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY s.source), 1) AS percent_of_source
FROM scores s JOIN classes c USING (pred)
GROUP BY s.source, c.class_name ORDER BY s.source, rows DESC""",
    ),
    "indicators": (
        "mean of every out-of-distribution indicator per source (z-scores against noise)",
        """SELECT source, count(*) AS rows, round(avg(ood_bn_mean::DOUBLE), 1) AS bn_mean,
       round(avg(ood_bn_var::DOUBLE), 1) AS bn_var,
       round(avg(ood_cos_class::DOUBLE), 1) AS cos_class, round(avg(ood_msp::DOUBLE), 1) AS msp,
       round(avg(ood_neg_energy::DOUBLE), 1) AS neg_energy, round(avg(ood_feat_norm::DOUBLE), 1) AS feat_norm
FROM scores GROUP BY source ORDER BY source""",
    ),
    "errors": (
        "the samples scoring could not read, counted by source and reason",
        """SELECT split_part(uid, ':', 1) AS source, error, count(*) AS samples
FROM errors GROUP BY ALL ORDER BY samples DESC""",
    ),
}

QUERY_STATEMENTS = {"SELECT", "EXPLAIN"}
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The single query in ``sql``; anything that is not a query (or more than one statement) is refused."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise UserError(f"bad SQL: {first_line(err)}") from None
    if len(statements) != 1:
        raise UserError(f"give exactly one query ({len(statements)} statements given)")
    kind = statements[0].type.name
    if kind not in QUERY_STATEMENTS:
        raise UserError(f"only queries are allowed (this is {kind}): curate sql never changes the scored pool")
    return sql.strip().rstrip(";")


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    query = check_read_only(con, sql)
    try:
        return con.sql(query)
    except duckdb.Error as err:
        raise UserError(f"query failed: {first_line(err)}") from None


def fetch(relation: duckdb.DuckDBPyRelation, limit: int | None = None) -> pa.Table:
    try:
        return (relation.limit(limit) if limit is not None else relation).to_arrow_table()
    except duckdb.Error as err:
        raise UserError(f"query failed: {first_line(err)}") from None


def write_result(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> int:
    """Write the whole result of a checked query to ``path`` (format from its suffix: Parquet, CSV, JSON lines)
    under a temporary name, then rename; returns the row count."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path}: end --out with {', '.join(OUTPUT_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    options = "FORMAT csv, HEADER true" if fmt == "csv" else f"FORMAT {fmt}"
    counted: list[int] = []

    def copy(temp: Path) -> None:
        target = sql_string(str(temp))
        try:
            # the newline ends a trailing `-- comment` of the query before the parenthesis closes
            counted.append(con.execute(f"COPY ({query}\n) TO {target} ({options})").fetchall()[0][0])
        except duckdb.Error as err:
            raise UserError(f"query failed: {first_line(err)}") from None

    write_atomically(path, copy)
    return int(counted[0])


def first_line(err: Exception) -> str:
    """DuckDB's message without its context lines."""
    return str(err).strip().splitlines()[0]
