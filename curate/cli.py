"""`curate`: the command line of the scoring and query stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curate.errors import run_app
from curate.options import config_from
from curate.query.config import ExportConfig, SelectConfig
from curate.refine.config import RefineConfig
from curate.score.config import ScoreConfig

app = typer.Typer(
    help="Score huge unlabeled image pools with a teacher, query them, and export curated shards.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _group() -> None:
    """Score huge unlabeled image pools with a teacher, query them, and export curated shards."""


@app.command()
def pools() -> None:
    """List the pool kinds, where each reads from (--root), and the options each takes.

    Use a kind as --pool KIND or --pool KIND:SPLIT, set options with
    --option NAME=VALUE, or mix sources in a TOML spec (see data/pools/).
    """
    from curate.pools import POOL_KINDS

    table = Table(title="pool kinds", show_lines=True)
    table.add_column("kind", style="bold cyan", no_wrap=True)
    table.add_column("what it reads")
    table.add_column("options")
    for kind in sorted(POOL_KINDS):
        cls = POOL_KINDS[kind]
        options = "\n".join(f"[bold]{name}[/]: {text}" for name, text in cls.options.items()) or "-"
        table.add_row(kind, f"{cls.summary}\n[dim]--root: {cls.root_help}[/]", options)
    Console().print(table)


@app.command()
def score(
    teacher: Annotated[Path, typer.Option(help="teacher file (checkpoint, TorchScript, .pt2, or pickled module), "
                                               "or torchvision:NAME[:WEIGHTS] / timm:NAME with weights from the "
                                               "library's cache or --teacher-weights")],
    pool: Annotated[str, typer.Option(help="KIND, KIND:SPLIT or a .toml mix spec (see `curate pools`)")],
    out: Annotated[Path, typer.Option(help="output folder for the scored shards")] = ScoreConfig.out,
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="pool option NAME=VALUE "
                                                                            "(repeatable)")] = None,
    teacher_meta: Annotated[Path | None, typer.Option(help="JSON meta supplying or overriding "
                                                           "the teacher's input spec")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="state_dict (torch.save or safetensors) of a "
                                                               "library teacher: --teacher torchvision:NAME or "
                                                               "timm:NAME")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow a pickled module (unpickling "
                                                    "runs code from the file)")] = False,
    batch_size: Annotated[int, typer.Option(
        help="images per teacher call (rows are read and written about 1,024 at a time, in whole calls)")
    ] = ScoreConfig.batch_size,
    workers: Annotated[int | None, typer.Option(help="DataLoader processes decoding the pool "
                                                "(default: 0 for array-backed pools, one per core for "
                                                "files/glyphs)")] = None,
    shard_rows: Annotated[int, typer.Option(help="pool positions per Parquet shard (the "
                                                 "unit of resume)")] = ScoreConfig.shard_rows,
    limit: Annotated[int | None, typer.Option(help="score only the first N samples of the pool")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = ScoreConfig.device,
    autocast: Annotated[bool | None, typer.Option(help="bf16/fp16 autocast (default: on for CUDA, off on CPU)")] = None,
    channels_last: Annotated[bool, typer.Option(
        help="channels-last memory format for convolutions")] = ScoreConfig.channels_last,
    decode: Annotated[str, typer.Option(help="where JPEGs of folder, webdataset and parquet pools are decoded: "
                                        "workers (CPU processes), device (where the teacher runs: nvJPEG on "
                                        "CUDA), auto (device on CUDA, else workers)")] = ScoreConfig.decode,
    reference_count: Annotated[int, typer.Option(help="noise images that standardise the indicators "
                                                      "(>= 64)")] = ScoreConfig.reference_count,
    executor: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray actor pool; pip install "
                                          "'hetero-distill\\[ray]')")] = ScoreConfig.executor,
    address: Annotated[str | None, typer.Option(help="ray: the cluster to join, HOST:PORT or auto (default: "
                                                "$RAY_ADDRESS, else a local Ray on this machine)")] = None,
    num_actors: Annotated[int | None, typer.Option(help="ray: teachers running at once "
                                                   "(default: one per GPU of the cluster, else one per CPU)")] = None,
) -> None:
    """Run the teacher once over a pool; write logits, embeddings and relatedness to Parquet shards.

    Resumable: rerun the same command after an interruption and it continues after the last complete shard
    (with either executor: both write the same rows).
    Example: curate score --teacher teacher.pt --pool data/pools/related-hidden.toml --out scored/
    On a Ray cluster: curate score ... --executor ray --address HEAD:6379
    """
    from curate.pools import parse_options
    from curate.score.runner import score_pool

    cfg = config_from(ScoreConfig, locals(), pool_options=parse_options(option or []))
    summary = score_pool(cfg)
    table = Table(title=f"{summary.out}: {summary.rows:,} rows, {summary.errors:,} unreadable, "
                        f"{summary.shards_written} shards written, {summary.shards_skipped} already complete, "
                        f"{summary.seconds:.1f} s")
    for column in ("source", "rows", "mean relatedness", "mean confidence"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, stats in sorted(summary.per_source.items(), key=lambda kv: -kv[1]["relatedness"]):
        table.add_row(source, f"{stats['rows']:,}", f"{stats['relatedness']:.2f}", f"{stats['confidence']:.3f}")
    Console().print(table)


def print_arrow(table, title: str) -> None:
    """A rich table of an Arrow table: numbers right-aligned, floats to 4 significant digits, lists shortened."""
    import pyarrow as pa

    view = Table(title=title)
    for field in table.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        view.add_column(field.name, justify="right" if numeric else "left")
    for row in table.to_pylist():
        view.add_row(*(_cell(value) for value in row.values()))
    Console().print(view)


def _cell(value) -> str:
    if value is None:
        return "[dim]null[/]"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:4])
        return f"[{shown}{', ...' if len(value) > 4 else ''}] ({len(value)})"
    return str(value)


@app.command()
def sql(
    query: Annotated[str | None, typer.Argument(help="one SELECT over the views scores, errors, classes")] = None,
    scored: Annotated[Path, typer.Option(help="scored pool folder (from curate score)")] = Path("scored"),
    example: Annotated[str | None, typer.Option(help="run a named example query instead (see --list-examples)")] = None,
    list_examples: Annotated[bool, typer.Option("--list-examples", help="print the example queries and exit")] = False,
    out: Annotated[Path | None, typer.Option(help="write the whole result to .parquet, "
                                                  ".csv or .json (JSON lines)")] = None,
    limit: Annotated[int, typer.Option(min=1, help="rows printed (not applied to --out)")] = 50,
    memory_limit: Annotated[str | None, typer.Option(help="DuckDB memory limit, e.g. 4GB "
                                                          "(default: 80% of RAM)")] = None,
) -> None:
    """Query a scored pool with DuckDB SQL (read-only).

    Views: scores (one row per sample: the columns of the scored pool), errors (uid, error) and
    classes (pred, class_name). Only the columns a query names are read from disk.
    Example: curate sql --scored scored/ "SELECT source, avg(relatedness) FROM scores GROUP BY source"
    """
    from curate.atomic import check_writable, temporary_name
    from curate.errors import UserError
    from curate.query.scored import ScoredPool
    from curate.query.sql import EXAMPLES, check_read_only, fetch, run_query, write_result

    if list_examples:
        for name, (what, text) in EXAMPLES.items():
            Console().print(f"[bold cyan]--example {name}[/]: {what}\n{text}\n", highlight=False)
        return
    if example is not None:
        if example not in EXAMPLES:
            raise UserError(f"no example {example!r}: choose one of {', '.join(EXAMPLES)}")
        if query is not None:
            raise UserError("give either a query or --example, not both")
        query = EXAMPLES[example][1]
    if query is None:
        raise UserError("give a query, e.g. \"SELECT count(*) FROM scores\", or --example NAME (--list-examples)")
    # --out is written by DuckDB under a temporary name: the one file outside the pool it may touch
    written = (temporary_name(out),) if out is not None else ()
    if out is not None:
        check_writable(out)
    con = ScoredPool.open(scored).connect(memory_limit=memory_limit, other_files=written)
    if out is not None:
        rows = write_result(con, check_read_only(con, query), out)
        Console().print(f"wrote {rows:,} rows to {out}")
        return
    table = fetch(run_query(con, query), limit + 1)
    shown = table.slice(0, limit)
    more = " (more rows not shown: raise --limit or use --out)" if table.num_rows > limit else ""
    print_arrow(shown, f"{shown.num_rows:,} rows{more}")


@app.command()
def index(
    scored: Annotated[Path, typer.Option(help="scored pool folder (from curate score)")] = Path("scored"),
    kind: Annotated[str, typer.Option(help="auto (flat under 200k rows, else IVF-PQ), flat, ivf or hnsw")] = "auto",
    budget_mb: Annotated[int, typer.Option(min=1, help="most MiB of float vectors held in memory at once")] = 2048,
    train_rows: Annotated[int, typer.Option(min=1000, help="sampled rows that train IVF-PQ")] = 100_000,
    seed: Annotated[int, typer.Option(help="seed of the training sample")] = 0,
) -> None:
    """Build a FAISS index (cosine) over the teacher embeddings, saved in SCORED/_index/.

    Used by `curate select --strategy knn` and by anyone who wants neighbours of an image.
    """
    from curate.query.index import build_index
    from curate.query.scored import ScoredPool

    summary = build_index(ScoredPool.open(scored), kind, budget_mb, train_rows, seed)
    params = ", ".join(f"{k}={v}" for k, v in summary.params.items()) or "exact"
    Console().print(f"{summary.kind} index of {summary.rows:,} x {summary.dim} ({params}) in {summary.seconds:.1f} s "
                    f"-> {summary.folder}")


@app.command()
def select(
    strategy: Annotated[str, typer.Option(help="uniform, topk, sample, balanced, diverse, knn or sql")],
    budget: Annotated[int, typer.Option(help="number of samples to select")],
    scored: Annotated[Path, typer.Option(help="scored pool folder (from curate score)")] = SelectConfig.scored,
    out: Annotated[Path, typer.Option(help="selection file to write (uid, weight, score columns)")] = SelectConfig.out,
    where: Annotated[str | None, typer.Option(help="SQL filter on the scores first, "
                                               "e.g. \"source <> 'noise'\"")] = None,
    by: Annotated[str, typer.Option(help="column or SQL expression ranking the rows (higher first)")] = SelectConfig.by,
    tau: Annotated[float, typer.Option(help="sample: temperature of softmax(by / tau)")] = SelectConfig.tau,
    epsilon: Annotated[float, typer.Option(
        help="sample: uniform share of the sampling probability")] = SelectConfig.epsilon,
    weights: Annotated[str, typer.Option(help="uniform, importance (1/inclusion probability) or class "
                                              "(equal total weight per predicted class)")] = SelectConfig.weights,
    dedup: Annotated[float | None, typer.Option(help="drop rows whose embedding cosine to a kept row exceeds this "
                                                     "(default 0.98 for diverse, off otherwise)")] = None,
    clusters: Annotated[int | None, typer.Option(help="diverse: k-means clusters (default "
                                                      "budget/32, at most 1024)")] = None,
    seeds: Annotated[Path | None, typer.Option(help="knn: folder of seed images (default: class prototypes)")] = None,
    per_seed: Annotated[int | None, typer.Option(help="knn: neighbours per seed (default budget / seeds)")] = None,
    query: Annotated[str | None, typer.Option(help="sql: SELECT uid[, weight] FROM candidates ...")] = None,
    teacher: Annotated[Path | None, typer.Option(help="knn --seeds: teacher to embed them "
                                                      "(default: the scoring one)")] = None,
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = SelectConfig.seed,
    memory_limit: Annotated[str | None, typer.Option(help="DuckDB memory limit, e.g. 4GB")] = None,
) -> None:
    """Choose and weight the samples to distil on; write SELECTION (uid, weight, source, pred, relatedness, ...).

    Steps compose: --where filters, the strategy ranks, --dedup drops near-duplicates and refills.
    Example: curate select --scored scored/ --strategy balanced --budget 20000 --weights class --out sel.parquet
    """
    from curate.query.select import Selector

    cfg = config_from(SelectConfig, locals())
    console = Console()
    with console.status(f"selecting {budget:,} rows ({strategy})"):
        summary = Selector(cfg).run()
    dropped = f", {summary.dropped_duplicates:,} near-duplicates skipped" if summary.dropped_duplicates else ""
    console.print(f"selected {summary.rows:,} of {summary.candidates:,} candidates{dropped} -> {summary.out}")
    if summary.rows < budget:
        console.print(f"[yellow]only {summary.rows:,} of the --budget {budget:,} rows: the rest were near-duplicates "
                      "(raise --dedup) or left out by the strategy[/]")
    for title, counts in (("source", summary.per_source), ("predicted class", summary.per_class)):
        table = Table(title=f"selection per {title}")
        table.add_column(title)
        table.add_column("rows", justify="right")
        table.add_column("share", justify="right")
        for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            table.add_row(name, f"{count:,}", f"{count / max(summary.rows, 1):.1%}")
        console.print(table)


@app.command()
def export(
    selection: Annotated[Path, typer.Option(help="selection file (from curate select or any query with a uid column)")],
    scored: Annotated[Path, typer.Option(help="scored pool folder the selection was made from")] = ExportConfig.scored,
    out: Annotated[Path, typer.Option(help="folder for the curated shards (must not "
                                           "exist or be empty)")] = ExportConfig.out,
    root: Annotated[Path | None, typer.Option(help="data folder of the pool (default: the one used to score)")] = None,
    shard_rows: Annotated[int, typer.Option(help="rows per shard (a multiple of "
                                                 "--row-group-rows)")] = ExportConfig.shard_rows,
    row_group_rows: Annotated[int, typer.Option(
        help="rows per Parquet row group (the streaming unit)")] = ExportConfig.row_group_rows,
    embedding: Annotated[bool, typer.Option(
        help="also store the teacher embedding (for feature distillation)")] = ExportConfig.embedding,
    seed: Annotated[int, typer.Option(help="seed of the shuffle across shards")] = ExportConfig.seed,
    workers: Annotated[int | None, typer.Option(help="DataLoader processes reading the pool")] = None,
    verify: Annotated[int, typer.Option(help="rows re-scored by the teacher to check the pool is unchanged "
                                                    "(0: skip)")] = ExportConfig.verify,
    format: Annotated[str, typer.Option(help="parquet (what train distill streams) or webdataset (tar shards: "
                                             "KEY.png, KEY.logits.npy, KEY.cls, KEY.json, for other "
                                             "trainers)")] = ExportConfig.format,
) -> None:
    """Read the selected samples back from the pool and write self-contained, shuffled shards for `train distill`.

    Example: curate export --scored scored/ --selection sel.parquet --out selected/
    (--format webdataset: the same rows as WebDataset tars with soft labels, for trainers outside this project)
    """
    from curate.query.export import export_selection

    summary = export_selection(config_from(ExportConfig, locals()))
    Console().print(f"wrote {summary.rows:,} samples in {summary.shards} shards to {summary.out} "
                    f"in {summary.seconds:.1f} s")


@app.command()
def refine(
    shards: Annotated[Path, typer.Option(help="curated folder to refine (from curate export)")],
    teacher: Annotated[Path, typer.Option(help="the teacher that scored it (file, or torchvision:NAME / "
                                               "timm:NAME)")],
    out: Annotated[Path, typer.Option(help="folder for the refined shards (must not exist or be "
                                           "empty)")] = RefineConfig.out,
    share: Annotated[float, typer.Option(help="share of every class's rows to refine: those whose feature "
                                              "statistics fall furthest from the teacher's")] = RefineConfig.share,
    steps: Annotated[int, typer.Option(help="optimiser steps per refined image")] = RefineConfig.steps,
    lr: Annotated[float, typer.Option(help="Adam's step size in pixel units (pixels range over "
                                           "[0, 1])")] = RefineConfig.lr,
    class_weight: Annotated[float, typer.Option(help="weight of the cross-entropy to the row's teacher class "
                                                     "beside the BatchNorm deviation")] = RefineConfig.class_weight,
    batch_size: Annotated[int, typer.Option(help="images per optimiser batch")] = RefineConfig.batch_size,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")] = RefineConfig.device,
    teacher_weights: Annotated[Path | None, typer.Option(help="state_dict for a library teacher")] = None,
) -> None:
    """Move the least related images of a curated folder toward the teacher's own data; write them re-scored.

    In each teacher class, the --share of rows least like the teacher's BatchNorm statistics
    get --steps Adam steps on their pixels toward them, keeping the row's class.
    Rows, uids and weights stay; refined rows get new pixels, logits and a "+refined" source.
    Example: curate refine --shards selected/ --teacher teacher.pt --out refined/
    """
    from curate.refine.run import refine_shards

    summary = refine_shards(config_from(RefineConfig, locals()))
    Console().print(f"refined {summary.refined:,} of {summary.rows:,} rows into {summary.out} in "
                    f"{summary.seconds:.1f} s: BatchNorm deviation {summary.deviation_before:.3f} -> "
                    f"{summary.deviation_after:.3f}, teacher class kept for {summary.class_kept:.1%}")


@app.command()
def report(
    scored: Annotated[Path, typer.Option(help="scored pool folder (from curate score)")] = Path("scored"),
    selection: Annotated[Path | None, typer.Option(help="also show what this selection takes from the pool")] = None,
    out: Annotated[Path, typer.Option(help="folder for report.md and the PNG plots")] = Path("report"),
) -> None:
    """Plots and a markdown summary of a scored pool: relatedness per source and class, selection composition."""
    from curate.query.report import write_report

    with Console().status("aggregating and plotting"):
        summary = write_report(scored, out, selection)
    Console().print(f"wrote {', '.join(summary.files)} to {summary.folder}")


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="curate")
