"""What a distillation checkpoint holds (``TrainState``) and its files: written atomically by rank 0, the last
``keep`` kept, read back (skipping one cut short) and handed to every rank on --resume."""

from __future__ import annotations

import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.errors import UserError
from curate.teachers import save_model, save_state
from train.config import SPEED_ONLY, DistillConfig
from train.losses import DistillLoss
from train.ranks import Ranks, from_main
from train.shards import ReaderState


def checkpoint_paths(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*.pt"))


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    save_state(state, out / f"ckpt-{step:08d}.pt")
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: touching every GPU would open a context on each
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_latest_checkpoint(cfg: DistillConfig) -> dict[str, Any]:
    for path in reversed(checkpoint_paths(cfg.out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint cut short is skipped for the one before it
            continue
        # an option the checkpoint does not name came after it was written: it ran with that option's default.
        # `out` is the folder the checkpoint was just read from: a run folder moved elsewhere resumes there.
        ran = {**DistillConfig(shards=cfg.shards).resolved(), **state["config"]}
        changed = {k for k, v in cfg.resolved().items()
                   if k not in SPEED_ONLY | {"out"} and not same_option(k, ran.get(k), v)}
        if changed:
            raise UserError(f"--resume with a changed config ({', '.join(sorted(changed))}): use the same options "
                            f"as the run in {cfg.out}, or a new --out")
        return state
    raise UserError(f"nothing to resume in {cfg.out}: no readable checkpoint (drop --resume to start afresh)")


PATH_OPTIONS = {name for name, hint in typing.get_type_hints(DistillConfig).items()
                if hint is Path or Path in typing.get_args(hint)}


def same_option(name: str, stored: Any, now: Any) -> bool:
    """Paths are the same file however they are written (relative, absolute, with ``..``)."""
    if name in PATH_OPTIONS and stored is not None and now is not None:
        return Path(stored).resolve() == Path(now).resolve()
    return stored == now


def checkpoint_on_every_rank(cfg: DistillConfig, ranks: Ranks) -> dict[str, Any]:
    """Rank 0 reads the checkpoint and sends it to the others (no shared filesystem needed); an error it
    meets is raised on every rank, so none is left waiting."""
    loaded: dict[str, Any] | str = {}
    if ranks.main:
        try:
            loaded = load_latest_checkpoint(cfg)
        except UserError as err:
            loaded = str(err)
    loaded = from_main(loaded, ranks)
    if isinstance(loaded, str):
        raise UserError(loaded)
    return loaded


def reader_after_resume(state: dict[str, Any], ranks: Ranks) -> ReaderState:
    """This rank's reader position. Ranks read different shards, so a checkpoint made by N ranks resumes on N
    ranks, or on any number where every rank stood at the start of the same epoch."""
    readers = [ReaderState(**r) for r in state["readers"]]
    if len(readers) == ranks.world:
        return readers[ranks.rank]
    if all(r.batch == 0 for r in readers) and len({r.epoch for r in readers}) == 1:
        return ReaderState(readers[0].epoch, 0)
    raise UserError(f"the checkpoint at step {state['step']} was written by {len(readers)} processes in the middle "
                    f"of an epoch: resume with {len(readers)} (torchrun --nproc_per_node ...), or from a checkpoint "
                    "written at an epoch boundary")


@dataclass
class TrainState:
    """What a checkpoint holds, besides the config: the trained modules and their optimiser, schedule and
    scaler, the RNG, the step, the metrics history and where each rank's reader stands."""

    student: torch.nn.Module
    loss_fn: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    average: torch.nn.Module | None = None  # the moving average of the student's weights (--ema)
    step: int = 0
    reader: ReaderState = field(default_factory=ReaderState)
    history: list[dict[str, Any]] = field(default_factory=list)

    def _stateful(self) -> dict[str, Any]:
        parts = {"model": self.student, "loss": self.loss_fn, "optimizer": self.optimizer,
                 "scheduler": self.scheduler, "scaler": self.scaler}
        return parts if self.average is None else {**parts, "average": self.average}

    @property
    def final_student(self) -> torch.nn.Module:
        """The student that is evaluated and saved: the moving average where there is one."""
        return self.student if self.average is None else self.average.module

    def state_dict(self, readers: list[dict[str, int]]) -> dict[str, Any]:
        """``readers``: every rank's position, gathered."""
        return {**{name: part.state_dict() for name, part in self._stateful().items()}, "rng": rng_states(),
                "readers": readers, "step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any], ranks: Ranks) -> None:
        for name, part in self._stateful().items():
            part.load_state_dict(state[name])
        restore_rng_states(state["rng"])
        self.reader, self.step, self.history = reader_after_resume(state, ranks), state["step"], state["history"]


def save_student(student: torch.nn.Module, cfg: DistillConfig, manifest: dict[str, Any], steps: int,
                 history: list[dict[str, Any]]) -> None:
    """``student.pt`` in --out, in the checkpoint format teachers use: the teacher's meta (task, classes, input
    spec) with the student's architecture, its distillation config and its last evaluated accuracy."""
    meta = {**{k: v for k, v in manifest["teacher"]["meta"].items() if k not in ("history", "config")},
            "arch": cfg.student, "width": cfg.student_width, "distilled_from": manifest["teacher"]["fingerprint"],
            "distill_config": cfg.resolved(), "steps": steps}
    last_eval = next((r for r in reversed(history) if "eval_accuracy" in r), None)
    if last_eval is not None:
        meta["test_accuracy"] = last_eval["eval_accuracy"]
    student = student.to("cpu", memory_format=torch.contiguous_format)
    save_model(student, meta, cfg.out / "student.pt", "checkpoint", arch=cfg.student,
               arch_options={"width": cfg.student_width})
