"""Training metrics out of the hot loop: per-step figures stay tensors until a log step, where they are
averaged (over the ranks too), the evaluation runs when due, and rank 0 appends a line to
``metrics.jsonl`` and updates the progress bar. The curves' PNG is drawn from the history at the end."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from curate.errors import UserError
from train.ranks import Ranks, mean_over_ranks


class MetricsLogger:
    """``step()`` once per training step; a context manager holding the progress bar and the metrics file."""

    def __init__(self, out: Path, ranks: Ranks, steps: int, start_step: int, log_every: int, eval_every: int,
                 evaluate: Callable[[], dict[str, float]] | None, lr: Callable[[], float],
                 history: list[dict[str, Any]]) -> None:
        self.out, self.ranks, self.steps, self.start_step = out, ranks, steps, start_step
        self.log_every, self.eval_every = log_every, eval_every
        self.evaluate, self.lr = evaluate, lr
        self.history = history  # the train state's: checkpointed with it
        self.pending: list[torch.Tensor] = []
        self.samples = 0
        self.started = time.perf_counter()
        columns = [TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        self.progress = Progress(*columns, disable=not ranks.main)
        self.file = None

    def __enter__(self) -> MetricsLogger:
        if self.ranks.main:
            self.file = open(self.out / "metrics.jsonl", "a")
        self.progress.__enter__()
        self.task = self.progress.add_task("distill", total=self.steps, completed=self.start_step, status="")
        return self

    def step(self, step: int, epoch: int, loss: torch.Tensor, fit: torch.Tensor, samples: int) -> None:
        """Figures of the step just taken (``step`` counts it); ``samples`` over all ranks."""
        self.pending.append(torch.stack([loss.detach(), fit]))
        self.samples += samples
        if step % self.log_every == 0 or step == self.steps:
            self._log(step, epoch)
        self.progress.update(self.task, completed=step)

    def _log(self, step: int, epoch: int) -> None:
        loss, fit = mean_over_ranks(torch.stack(self.pending).mean(0), self.ranks).tolist()
        if not math.isfinite(loss):  # every rank sees the same mean, so every rank stops here
            raise UserError(f"the distillation loss became {loss} by step {step}: training diverged and no student "
                            "is saved; lower --lr and start again in a new --out")
        rate = self.samples / (time.perf_counter() - self.started)
        record = {"step": step, "epoch": epoch, "loss": loss, "teacher_fit": fit, "lr": self.lr(),
                  "samples_per_s": rate}
        if self.evaluate is not None and (step % self.eval_every == 0 or step == self.steps):
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        status = f"loss {loss:.3f} fit {fit:.3f} {rate:.0f} img/s"
        if "eval_accuracy" in record:
            status += f" eval {record['eval_accuracy']:.3f}"
        self.progress.update(self.task, status=status)
        self.pending, self.samples, self.started = [], 0, time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        if self.file is not None:
            self.file.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, fit to the targets and evaluation figures against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    left.plot(steps, [r["loss"] for r in history], label="loss")
    left.set_xlabel("step")
    left.set_ylabel("distillation loss")
    left.set_yscale("log")
    right.plot(steps, [r["teacher_fit"] for r in history], label="argmax agrees with targets (train)")
    evaluated = [r for r in history if "eval_accuracy" in r]
    if evaluated:
        right.plot([r["step"] for r in evaluated], [r["eval_accuracy"] for r in evaluated], "o-", label="eval accuracy")
        if "eval_agreement" in evaluated[0]:
            right.plot([r["step"] for r in evaluated], [r["eval_agreement"] for r in evaluated], "s--",
                       label="eval agreement with teacher")
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
