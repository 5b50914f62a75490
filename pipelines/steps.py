"""Resumable pipelines: a list of steps, each one command of `curate` or `train`, run in this process (or,
for independent steps, several at once in processes of their own: ``StepRunner.run_at_once``).

A step is the exact command line a person would type; the pipeline runs it through the same entry point
(so what the report lists is what ran) and drops a completion marker ``<out>/.done/<step>`` when it
succeeds (holding its command line). Run again after an interruption, finished steps are skipped, steps
whose command line changed since they ran are run again from scratch, and the one that was cut short
starts again, continuing where its command can (`curate score` resumes by shard, `train distill` from
its last checkpoint via ``resume_with``); a step whose command writes its output atomically (a teacher
file, a selection, a shard folder) counts as done when that output is there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from curate.errors import UserError

console = Console(stderr=True)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Step:
    name: str  # unique, file-name safe: the completion marker's name
    stage: str  # timings are summed per stage
    argv: list[str]  # ["curate" | "train", subcommand, options...]
    output: Path | None = None  # written whole or not at all by its command: if there, the step is done
    writes: Path | None = None  # where a command that is not atomic writes (a run folder, a scored pool)
    resume_with: list[str] = field(default_factory=list)  # extra options when a cut-short run is found
    resumable: Callable[[], bool] = lambda: False  # whether a cut-short run is there to continue

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def argv_now(self) -> list[str]:
        """The command line to run now: with ``resume_with`` when a cut-short run is there to continue."""
        return self.argv + (self.resume_with if self.resumable() else [])


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


@dataclass(frozen=True)
class Lanes:
    """How many independent steps run at once, and the compute threads each gets."""

    count: int
    threads: int

    @classmethod
    def for_this_machine(cls, jobs: int | None = None) -> Lanes:
        """``jobs`` at once (default: one per core, at most 4, on a CPU; one on a GPU, which the steps would
        share), the cores split evenly between them."""
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = jobs or (1 if torch.cuda.is_available() else min(cores, 4))
        return cls(count, max(1, cores // count))


def parent_death_signal() -> Callable[[], None] | None:
    """A function for a step's process to run before it starts, so that it ends with the pipeline (Linux:
    PR_SET_PDEATHSIG) and a killed pipeline leaves no step running that its rerun would find holding the run
    folder's lock; None where the C library has no prctl. The library is looked up here, in the parent: the
    lookup may start a process (ldconfig), which is unsafe between fork and exec."""
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
        """Its marker is there with its command line, or its atomic output (a run killed after writing it, before
        the marker). A marker left by another command line (a changed profile or recipe) is stale: the step's
        output is removed and it runs again, so no result of an older design passes for one of this design."""
        marker = self.markers / step.name
        if marker.exists():
            ran = marker.read_text().strip()
            if ran == step.command:
                return True
            console.print(f"{step.name} ran before as `{ran}`; its command changed, so it runs again", style="yellow")
            for path in {step.output, step.writes} - {None}:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            marker.unlink()
            return False
        return step.output is not None and step.output.exists()

    def run(self, step: Step) -> None:
        self.commands.append(step.command)
        if self.done(step):
            return
        argv = step.argv_now()
        console.rule(f"[bold]{step.stage}[/]: {step.name}")
        console.print(shlex.join(argv), style="dim", soft_wrap=True)
        started = time.perf_counter()
        run_command(argv)
        seconds = time.perf_counter() - started
        console.print(f"{step.name} done in {seconds:.1f} s", style="dim")
        self.add_time(step.stage, seconds)
        self.mark_done(step)

    def mark_done(self, step: Step) -> None:
        (self.markers / step.name).write_text(step.command + "\n")

    def run_at_once(self, steps: list[Step], lanes: Lanes) -> None:
        """Run independent steps ``lanes.count`` at a time, each as its own process (``python -m curate|train``
        with the same command line) with ``lanes.threads`` compute threads, its output in ``<out>/logs/``.
        On a small CPU two single-threaded distillations get through more steps than one using both cores
        (a step of a small network does not split well over threads). One lane runs the steps in order, in
        this process."""
        if lanes.count == 1:
            for step in steps:
                self.run(step)
            return
        self.commands += [step.command for step in steps]
        todo = [step for step in steps if not self.done(step)]
        if not todo:
            return
        logs = self.markers.parent / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(lanes.threads), "MKL_NUM_THREADS": str(lanes.threads)}
        die_with_parent = parent_death_signal()
        running: dict[subprocess.Popen, tuple[Step, float, Path]] = {}
        failed: list[tuple[Step, Path]] = []
        counted = time.perf_counter()  # the stage's wall time is added as its steps finish: a killed run keeps it
        console.rule(f"[bold]{todo[0].stage}[/]: {len(todo)} steps, {lanes.count} at a time, "
                     f"{lanes.threads} thread(s) each; output in {logs}")
        try:
            while todo or running:
                while todo and len(running) < lanes.count and not failed:
                    step = todo.pop(0)
                    argv = step.argv_now()
                    log = logs / f"{step.name}.log"
                    with open(log, "a") as sink:
                        process = subprocess.Popen([sys.executable, "-m", *argv], stdout=sink,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                                   preexec_fn=die_with_parent)
                    running[process] = (step, time.perf_counter(), log)
                    console.print(f"started {step.name}: {shlex.join(argv)}", style="dim", soft_wrap=True)
                if not todo or failed or len(running) >= lanes.count:
                    time.sleep(0.5)
                for process in [p for p in running if p.poll() is not None]:
                    step, began, log = running.pop(process)
                    if process.returncode == 0:
                        self.mark_done(step)
                        now = time.perf_counter()
                        self.add_time(step.stage, now - counted)
                        counted = now
                        console.print(f"{step.name} done in {now - began:.1f} s", style="dim")
                    else:
                        failed.append((step, log))
                if failed and not running:
                    todo = []
        finally:
            for process in running:
                process.terminate()
            for process in running:
                process.wait()
            self.add_time(steps[0].stage, time.perf_counter() - counted)  # wall time of the stage, not the sum
        if failed:
            step, log = failed[0]
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise UserError(f"`{step.command}` failed; the end of {log}:\n" + "\n".join(tail) +
                            "\nfix it and run the pipeline again to continue")

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self.timings_file.write_text(json.dumps(self.timings, indent=1))
