"""`curate`: the command line of the scoring and query stages."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from curate.errors import run_app
from curate.pools import POOL_KINDS

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


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="curate")
