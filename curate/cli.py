"""`curate`: the command line of the scoring and query stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curate.errors import run_app
from curate.pools import POOL_KINDS, parse_options

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
    teacher: Annotated[Path, typer.Option(help="teacher file: checkpoint, TorchScript, .pt2, or pickled module")],
    pool: Annotated[str, typer.Option(help="KIND, KIND:SPLIT or a .toml mix spec (see `curate pools`)")],
    out: Annotated[Path, typer.Option(help="output folder for the scored shards")] = Path("scored"),
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="pool option NAME=VALUE (repeatable)")] = None,
    teacher_meta: Annotated[Path | None, typer.Option(help="JSON meta supplying or overriding the teacher's input spec")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow a pickled module (unpickling runs code from the file)")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="DataLoader processes decoding the pool "
                                                "(default: 0 for array-backed pools, one per core for files/glyphs)")] = None,
    shard_rows: Annotated[int, typer.Option(min=1, help="pool positions per Parquet shard (the unit of resume)")] = 65536,
    limit: Annotated[int | None, typer.Option(min=1, help="score only the first N samples of the pool")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    autocast: Annotated[bool | None, typer.Option(help="bf16/fp16 autocast (default: on for CUDA, off on CPU)")] = None,
    channels_last: Annotated[bool, typer.Option(help="channels-last memory format for convolutions")] = True,
    reference_count: Annotated[int, typer.Option(min=64, help="noise images that standardise the indicators")] = 2048,
) -> None:
    """Run the teacher once over a pool; write logits, embeddings and relatedness to Parquet shards.

    Resumable: rerun the same command after an interruption and it continues after the last complete shard.
    Example: curate score --teacher teacher.pt --pool data/pools/related-hidden.toml --out scored/
    """
    from curate.score import ScoreConfig, score_pool

    cfg = ScoreConfig(teacher=teacher, pool=pool, out=out, root=root, pool_options=parse_options(option or []),
                      teacher_meta=teacher_meta, trust_pickle=trust_pickle, batch_size=batch_size, workers=workers,
                      shard_rows=shard_rows, limit=limit, device=device, autocast=autocast,
                      channels_last=channels_last, reference_count=reference_count)
    summary = score_pool(cfg)
    table = Table(title=f"{summary.out}: {summary.rows:,} rows, {summary.errors:,} unreadable, "
                        f"{summary.shards_written} shards written, {summary.shards_skipped} already complete, "
                        f"{summary.seconds:.1f} s")
    for column in ("source", "rows", "mean relatedness", "mean confidence"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, stats in sorted(summary.per_source.items(), key=lambda kv: -kv[1]["relatedness"]):
        table.add_row(source, f"{stats['rows']:,}", f"{stats['relatedness']:.2f}", f"{stats['confidence']:.3f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="curate")
