"""`train distill`: a student learns from curated shards, streaming, resumable to the exact bit.

Read top to bottom: factories build the components from one config (train/config.py) -> the trainer:
one ``train_step`` per batch, checkpoints of its ``TrainState`` (train/checkpoint.py), the student saved at
the end -> ``distill``: build, maybe resume, loop, save. Metrics stay out of the loop (train/metrics.py).

Exact resume: every random draw of a step (augmentation, mixing) comes from a generator seeded by
(seed, step, rank), and the batch of a step is a pure function of the reader's position (train/shards.py),
so a checkpoint needs model, optimiser, schedule, scaler and each rank's reader (epoch, batch); the global
RNG states are saved and restored as well for anything outside those.

Distributed: under ``torchrun`` the student and the loss head train as one DistributedDataParallel module
(gloo on CPU, NCCL on GPU, train/ranks.py). ``--batch-size`` is the global batch, split evenly over the
ranks, so steps and samples do not depend on the process count. Each rank reads its own share of the
shards; rank 0 gathers every rank's reader position and writes checkpoints, metrics and the student.
"""

from __future__ import annotations

import functools
import itertools
import json
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from curate.device import DeviceFeed, tensors_to
from curate.errors import UserError
from curate.locks import FolderLock
from curate.models import build_model, channels_last_is_safe
from curate.selected import CuratedShards
from curate.spec import InputSpec
from curate.teachers import TEACHER_ONLY, Teacher, load_teacher
from train.adaptive import HardestViews
from train.augment import StepViews, step_generator
from train.average import averaged_student
from train.boundary import BoundaryViews
from train.checkpoint import TrainState, checkpoint_on_every_rank, checkpoint_paths, save_checkpoint, save_student
from train.config import DistillConfig
from train.evaluate import Evaluator, HeldOutAgreement
from train.losses import DistillLoss, LossTerms, balanced_class_weights
from train.metrics import MetricsLogger, plot_curves
from train.online import OnlineTeacher, feature_target_dim
from train.optim import build_optimizer, cosine_with_warmup, mixed_precision
from train.ranks import Ranks, gather, init_ranks, rank_device
from train.row_audit import RowRecorder
from train.shards import EpochPlan, ReaderState, ShardBatches, held_out_rows, reader_workers

# -- factories -------------------------------------------------------------------------------------------------


def build_student(cfg: DistillConfig, shards: CuratedShards) -> torch.nn.Module:
    channels, size, _ = shards.image_shape
    return build_model(cfg.student, shards.num_classes, channels, size, cfg.student_width)


def build_teacher(cfg: DistillConfig, shards: CuratedShards, device: torch.device) -> Teacher | None:
    if cfg.teacher is None:
        return None
    teacher = load_teacher(cfg.teacher, device=device, flags=TEACHER_ONLY, weights=cfg.teacher_weights)
    if teacher.fingerprint != shards.manifest["teacher"]["fingerprint"]:
        raise UserError(f"{cfg.teacher} is not the teacher that scored these shards: pass the same teacher file")
    teacher.model.eval()
    return teacher


def build_stream(cfg: DistillConfig, shards: CuratedShards, ranks: Ranks,
                 held_out: np.ndarray | None) -> ShardBatches:
    rows_per_rank = round(cfg.batch_size // ranks.world * cfg.candidates)  # rows read per step
    # checked alike on every rank: each rank needs a batch of its own
    if shards.rows < (reads := rows_per_rank * ranks.world):
        raise UserError(f"{cfg.shards} holds {shards.rows:,} rows, fewer than the {reads:,} read per step "
                        "(--batch-size times --candidates): lower them or select more")
    plan_for = functools.partial(EpochPlan, shards, rows_per_rank, cfg.seed, rank=ranks.rank,
                                 world=ranks.world, lanes=cfg.lanes, window_groups=cfg.window_groups,
                                 weighted=cfg.weighting == "sample", held_out=held_out)
    return ShardBatches(shards, plan_for, with_embedding=cfg.feature_weight > 0 and cfg.teacher is None)


class DistillStep(torch.nn.Module):
    """Student and loss head as one module, so DistributedDataParallel sees every parameter in one forward."""

    def __init__(self, student: torch.nn.Module, loss_fn: DistillLoss, compile: bool) -> None:
        super().__init__()
        self.student, self.loss_fn = student, loss_fn
        self.embed = torch.compile(student.features) if compile else student.features  # the head stays eager

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                teacher_embedding: torch.Tensor | None) -> tuple[LossTerms, torch.Tensor]:
        logits = self.student.classifier(features := self.embed(inputs))
        return self.loss_fn(logits.float(), targets, weights, features, teacher_embedding), logits


# -- the trainer -----------------------------------------------------------------------------------------------


class Trainer:
    """The components of one run, built in a fixed order (the global RNG initialises student, teacher
    architecture and loss head in turn), and the loop over them."""

    def __init__(self, cfg: DistillConfig, ranks: Ranks) -> None:
        self.cfg, self.ranks = cfg, ranks
        torch.manual_seed(cfg.seed)
        self.device = device = rank_device(cfg.device, ranks)
        self.shards = shards = CuratedShards.open(cfg.shards)
        self.spec = InputSpec.from_meta(shards.manifest["input_spec"])
        self.normalize = self.spec.normalize()
        self.steps = cfg.total_steps(shards.rows)
        student = build_student(cfg, shards)
        self.memory_format = torch.channels_last if channels_last_is_safe(student, device) else torch.contiguous_format
        student = student.to(device, memory_format=self.memory_format)
        self.views = StepViews(cfg, self.normalize, self.spec.in_channels, self.steps, ranks.rank, self.memory_format)
        self.teacher = build_teacher(cfg, shards, device)
        self.online = OnlineTeacher.of(self.teacher, with_features=cfg.feature_weight > 0)
        loss_fn = DistillLoss(cfg.loss, cfg.temperature, cfg.hard_weight, cfg.feature_weight,
                              student.classifier.in_features, feature_target_dim(cfg, shards, self.online)).to(device)
        optimizer = build_optimizer(cfg.optimizer, list(student.parameters()) + list(loss_fn.parameters()), cfg.lr,
                                    cfg.weight_decay)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.steps * 3 // 100)
        self.use_amp, self.amp_dtype, scaler = mixed_precision(cfg.amp, device)
        self.state = TrainState(student, loss_fn, optimizer, cosine_with_warmup(optimizer, warmup, self.steps), scaler,
                                averaged_student(cfg.ema, student))
        self.step_module: torch.nn.Module = DistillStep(student, loss_fn, cfg.compile)
        self.evaluator = Evaluator(cfg.eval_dataset, cfg.eval_root, self.spec, shards.num_classes, self.teacher,
                                   device, cfg.eval_limit) if cfg.eval_dataset and ranks.main else None
        held_out = held_out_rows(shards.rows, cfg.holdout)
        self.stream = build_stream(cfg, shards, ranks, held_out)
        self.boundary = BoundaryViews.of(cfg.boundary_views, self.teacher, self.spec, shards.num_classes)
        self.pick = HardestViews.of(cfg.candidates, cfg.batch_size // ranks.world, cfg.temperature, shards.num_classes)
        self.holdout = HeldOutAgreement.of(self.stream, held_out, self.normalize, device) if ranks.main else None

    def start(self) -> None:
        """Wrap for DDP (after a resume: every rank starts from rank 0's weights) and open the run folder."""
        if self.ranks.world > 1:
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.cfg.out.mkdir(parents=True, exist_ok=True)  # on every rank: each records its rows there
        if self.ranks.main:
            (self.cfg.out / "config.json").write_text(json.dumps(self.cfg.resolved(), indent=1))

    def train_step(self, batch: dict[str, Any]) -> tuple[LossTerms, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment, mix, push views to the teacher's boundaries, label (stored or online), keep the hardest views,
        weight, forward, backward; returns the loss terms, the student's logits, the targets, the rows trained on."""
        cfg, device, state = self.cfg, self.device, self.state
        generator = step_generator(cfg.seed, state.step, self.ranks.rank)
        inputs = self.views(batch["pixels"], state.step, generator)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            if self.boundary is not None:
                inputs = self.boundary(inputs, generator)
            targets, embedding = self.online(inputs) if self.online is not None else (batch["logits"],
                                                                                        batch.get("embedding"))
            if self.pick is not None:
                chosen = self.pick(state.student, inputs, targets)
                inputs, targets = inputs[chosen], targets[chosen]
                embedding = None if embedding is None else embedding[chosen]
                batch = {name: batch[name][chosen] for name in ("index", "weight") if name in batch}
            weights = batch["weight"] if cfg.weighting == "loss" else None
            if cfg.balance_views:
                balanced = balanced_class_weights(targets)
                weights = balanced if weights is None else balanced * weights
            terms, logits = self.step_module(inputs, targets, weights, embedding)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(terms.total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        if state.average is not None:
            state.average.update_parameters(state.student)
        return terms, logits, targets, batch["index"]

    def evaluate(self) -> dict[str, float]:
        student = self.state.final_student
        figures = self.evaluator(student) if self.evaluator is not None else {}
        if self.holdout is not None:
            figures.update(self.holdout(student))
        self.state.student.train()
        return figures

    def train(self) -> None:
        cfg, ranks, state = self.cfg, self.ranks, self.state
        recorder = RowRecorder(cfg.out, ranks.rank, state.step) if cfg.record_rows else None
        workers = reader_workers(cfg.workers, self.device)
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers,
                            sampler=itertools.islice(self.stream.keys(state.reader), self.steps - state.step),
                            prefetch_factor=4 if workers else None, pin_memory=self.device.type == "cuda")
        logger = MetricsLogger(cfg.out, ranks, self.steps, state.step, cfg.log_every, cfg.eval_every,
                               self.evaluate if self.evaluator is not None or self.holdout is not None else None,
                               lambda: state.scheduler.get_last_lr()[0], state.history)
        with logger:
            state.student.train()
            for batch in DeviceFeed(loader, tensors_to, self.device):
                terms, logits, targets, rows = self.train_step(batch)
                if recorder is not None:
                    recorder.write(state.step, batch["key"][0], rows.cpu())
                state.step += 1
                state.reader = ReaderState(batch["key"][0], batch["key"][1] + 1)
                logger.step(state.step, state.reader.epoch, terms.total,
                            (logits.argmax(1) == targets.argmax(1)).float().mean(), len(logits) * ranks.world)
                if state.step % cfg.ckpt_every == 0 or state.step == self.steps:
                    self.checkpoint()
        if recorder is not None:
            recorder.close()

    def checkpoint(self) -> None:
        """Every rank hands in its reader position; rank 0 writes the checkpoint."""
        reader = self.state.reader
        # a reader that finished its epoch stands at the next one, so epoch boundaries are recognisable
        if reader.batch == len(self.stream.plan(reader.epoch)):
            reader = ReaderState(reader.epoch + 1, 0)
        readers = gather(reader.to_dict(), self.ranks)
        if self.ranks.main:
            state = {**self.state.state_dict(readers), "config": self.cfg.resolved()}
            save_checkpoint(self.cfg.out, self.state.step, state, self.cfg.keep)

    def save_student(self) -> None:
        """The student in the checkpoint format teachers use (rank 0), with the curves' PNG."""
        save_student(self.state.final_student, self.cfg, self.shards.manifest, self.steps, self.state.history)
        plot_curves(self.state.history, self.cfg.out / "curves.png")


def distill(cfg: DistillConfig, resume: bool = False) -> dict[str, Any]:
    ranks = init_ranks(cfg.device)
    if cfg.batch_size % ranks.world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                        f"{ranks.world} processes: use a multiple of {ranks.world}")
    with FolderLock(cfg.out) if ranks.main else nullcontext():  # rank 0 writes the run folder, one run at a time
        trainer = Trainer(cfg, ranks)
        if resume:
            trainer.state.load_state_dict(checkpoint_on_every_rank(cfg, ranks), ranks)
        elif ranks.main and checkpoint_paths(cfg.out):
            raise UserError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose a new --out")
        trainer.start()
        trainer.train()
        if ranks.main:
            trainer.save_student()
        if ranks.world > 1:
            # leave together: a rank that exits first closes its gloo sockets under the others, which the
            # transport may report as a lost peer (seen once as an abort in a two-rank test)
            dist.barrier()
    return {"steps": trainer.steps, "history": trainer.state.history, "student": cfg.out / "student.pt"}
