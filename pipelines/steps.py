"""Resumable pipelines: a list of steps, each one command of `curate` or `train`, run in this process.

A step is the exact command line a person would type; the pipeline runs it through the same entry point
(so what the report lists is what ran) and drops a completion marker ``<out>/.done/<step>`` when it
succeeds. Run again after an interruption, finished steps are skipped and the one that was cut short
starts again, continuing where its command can (`curate score` resumes by shard, `train distill` from
its last checkpoint via ``resume_with``); a step whose command writes its output atomically (a teacher
file, a selection, a shard folder) counts as done when that output is there.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from curate.errors import UserError

console = Console(stderr=True)


@dataclass
class Step:
    name: str  # unique, file-name safe: the completion marker's name
    stage: str  # timings are summed per stage
    argv: list[str]  # ["curate" | "train", subcommand, options...]
    output: Path | None = None  # written whole or not at all by its command: if there, the step is done
    resume_with: list[str] = field(default_factory=list)  # extra options when a cut-short run is found
    resumable: Callable[[], bool] = lambda: False  # whether a cut-short run is there to continue

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def run_command(argv: Sequence[str]) -> None:
    """Run ``curate ...`` or ``train ...`` in this process; a failing command raises :class:`UserError`."""
    from curate.cli import main as curate_main
    from train.cli import main as train_main

    entry = {"curate": curate_main, "train": train_main}.get(argv[0])
    if entry is None:
        raise ValueError(f"not a curate or train command: {shlex.join(argv)}")
    try:
        entry(list(argv[1:]))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise UserError(f"`{shlex.join(argv)}` failed (exit code {exit_.code}): see its message above; "
                            "fix it and run the pipeline again to continue") from None


class StepRunner:
    """Runs steps in order, skipping those with a completion marker; wall time per stage is kept in
    ``<out>/.done/timings.json`` across interrupted runs."""

    def __init__(self, out: Path) -> None:
        self.markers = out / ".done"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.timings_file = self.markers / "timings.json"
        self.timings: dict[str, float] = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        self.commands: list[str] = []

    def done(self, step: Step) -> bool:
        """Its marker is there, or its atomic output (a run killed after writing it, before the marker)."""
        return (self.markers / step.name).exists() or (step.output is not None and step.output.exists())

    def run(self, step: Step) -> None:
        self.commands.append(step.command)
        if self.done(step):
            return
        argv = step.argv + (step.resume_with if step.resumable() else [])
        console.rule(f"[bold]{step.stage}[/]: {step.name}")
        console.print(shlex.join(argv), style="dim", soft_wrap=True)
        started = time.perf_counter()
        run_command(argv)
        seconds = time.perf_counter() - started
        console.print(f"{step.name} done in {seconds:.1f} s", style="dim")
        self.add_time(step.stage, seconds)
        (self.markers / step.name).write_text(step.command + "\n")

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.timings_file.write_text(json.dumps(self.timings, indent=1))
