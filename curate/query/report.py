"""`curate report`: plots and a markdown summary of a scored pool (and optionally a selection).

Every figure is drawn from small DuckDB aggregates (histogram bins, per-group
counts, a seeded sample for the scatter), so a report of a 10M-row pool reads
the narrow columns once and never loads the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from curate.errors import UserError  # noqa: E402
from curate.query.scored import ScoredPool, sql_string  # noqa: E402

SCATTER_POINTS = 20_000


@dataclass
class ReportSummary:
    folder: Path
    files: list[str]


def _rows(con, query: str) -> list[tuple]:
    return con.execute(query).fetchall()


def _markdown_table(header: list[str], rows: list[list]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plot_relatedness_histogram(con, path: Path, bins: int = 60) -> None:
    lo, hi = _rows(con, "SELECT quantile_cont(relatedness, 0.001), quantile_cont(relatedness, 0.999) FROM scores")[0]
    width = max((hi - lo) / bins, 1e-6)
    counts = _rows(con, f"""SELECT source,
                             least(greatest(floor((relatedness - {lo}) / {width}), 0), {bins - 1})::INT AS b,
                             count(*) FROM scores GROUP BY ALL""")
    by_source: dict[str, np.ndarray] = {}
    for source, b, n in counts:
        by_source.setdefault(source, np.zeros(bins))[b] += n
    centers = lo + (np.arange(bins) + 0.5) * width
    fig, ax = plt.subplots(figsize=(9, 5))
    order = sorted(by_source, key=lambda s: -float((by_source[s] * centers).sum() / by_source[s].sum()))
    for source in order:
        hist = by_source[source]
        ax.step(centers, hist / hist.sum(), where="mid", label=f"{source} ({int(hist.sum()):,})")
    ax.set_xlabel("relatedness (higher = more like the teacher's data)")
    ax.set_ylabel("share of the source")
    ax.set_title("relatedness per source")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confidence_vs_relatedness(con, path: Path, seed: int = 0) -> None:
    sample = con.sql(f"""SELECT source, relatedness, confidence FROM scores
                         ORDER BY hash(uid || ':{seed}') LIMIT {SCATTER_POINTS}""").fetchnumpy()
    fig, ax = plt.subplots(figsize=(8, 6))
    for source in np.unique(sample["source"]):
        mask = sample["source"] == source
        ax.scatter(sample["relatedness"][mask], sample["confidence"][mask], s=3, alpha=0.4, label=source)
    ax.set_xlabel("relatedness")
    ax.set_ylabel("teacher confidence (max softmax)")
    ax.set_title(f"confidence vs relatedness ({len(sample['source']):,} sampled rows)")
    ax.legend(fontsize=7, markerscale=4, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_composition(labels: list[str], pool_share: list[float], selected_share: list[float], title: str,
                     path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.35 * len(labels) + 1)))
    y = np.arange(len(labels))
    ax.barh(y - 0.2, pool_share, height=0.4, label="scored pool")
    ax.barh(y + 0.2, selected_share, height=0.4, label="selection (weighted)")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("share")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(scored_folder: Path, out: Path, selection: Path | None = None) -> ReportSummary:
    scored = ScoredPool.open(scored_folder)
    con = scored.connect(other_files=(selection,) if selection is not None else ())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror}): choose another --out") from None
    files = ["relatedness_by_source.png", "confidence_vs_relatedness.png"]
    plot_relatedness_histogram(con, out / files[0])
    plot_confidence_vs_relatedness(con, out / files[1])

    per_source = _rows(con, """SELECT source, count(*), avg(relatedness), quantile_cont(relatedness, 0.1),
                                      median(relatedness), quantile_cont(relatedness, 0.9), avg(confidence)
                               FROM scores GROUP BY source ORDER BY 3 DESC""")
    per_class = _rows(con, """SELECT c.class_name, count(*), avg(s.relatedness), avg(s.confidence)
                              FROM scores s JOIN classes c USING (pred)
                              GROUP BY c.pred, c.class_name ORDER BY c.pred""")
    errors = _rows(con, "SELECT count(*) FROM errors")[0][0]
    lines = [f"# Scored pool `{scored.folder}`", "",
             f"{scored.rows:,} rows, {errors:,} unreadable samples, teacher `{scored.fingerprint[:12]}` "
             f"({scored.num_classes} classes). Relatedness is a sum of z-scores against noise: "
             f"{', '.join(scored.manifest.get('teacher', {}).get('relatedness', []))}.", "",
             "## Per source", "",
             _markdown_table(["source", "rows", "mean relatedness", "p10", "median", "p90", "mean confidence"],
                             [list(r) for r in per_source]), "",
             f"![relatedness per source]({files[0]})", "",
             "## Per predicted class", "",
             _markdown_table(["predicted class", "rows", "mean relatedness", "mean confidence"],
                             [list(r) for r in per_class]), "",
             f"![confidence vs relatedness]({files[1]})", ""]

    if selection is not None:
        if not selection.exists():
            raise UserError(f"no selection file {selection}: run `curate select` first")
        con.execute(f"CREATE VIEW selection AS SELECT * FROM read_parquet({sql_string(str(selection))})")
        total_weight, rows = _rows(con, "SELECT sum(weight), count(*) FROM selection")[0]
        for column, title, name in (("source", "per source", "selection_by_source.png"),
                                    ("class_name", "per predicted class", "selection_by_class.png")):
            key = "c.class_name" if column == "class_name" else "s.source"
            pool = dict(_rows(con, f"SELECT {key}, count(*) FROM scores s JOIN classes c USING (pred) GROUP BY 1"))
            chosen = dict(_rows(con, f"""SELECT {key}, sum(sel.weight) FROM selection sel JOIN scores s USING (uid)
                                         JOIN classes c ON s.pred = c.pred GROUP BY 1"""))
            labels = sorted(pool, key=lambda k: -pool[k])
            plot_composition(labels, [pool[k] / scored.rows for k in labels],
                             [chosen.get(k, 0) / total_weight for k in labels], f"selection {title}", out / name)
            files.append(name)
            lines += [f"## Selection {title}", "",
                      _markdown_table([column, "pool rows", "pool share", "selected weight share"],
                                      [[k, pool[k], pool[k] / scored.rows, chosen.get(k, 0) / total_weight]
                                       for k in labels]), "", f"![selection {title}]({name})", ""]
        lines.insert(2, f"Selection `{selection}`: {rows:,} rows, total weight {total_weight:,.1f}.\n")
    (out / "report.md").write_text("\n".join(lines))
    return ReportSummary(out, files + ["report.md"])
