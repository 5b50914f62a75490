"""`train distill`: a student learns from curated shards, streaming, resumable to the exact bit.

Read top to bottom: config -> components (shards, student, teacher, loss, optimiser, schedule, eval)
built by small factories -> checkpoint save/restore -> the loop -> outputs. Metrics are gathered as
tensors in the loop and written every ``log_every`` steps, so logging stays out of the hot path.

Exact resume: every random draw of a step (augmentation, mixing) comes from a generator seeded by
(seed, step), and the batch of a step is a pure function of the reader's position (train/shards.py),
so a checkpoint needs model, optimiser, schedule, scaler and the reader's (epoch, batch); the global
RNG states are saved and restored as well for anything outside those.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from curate.atomic import write_atomically
from curate.device import pick_device
from curate.errors import UserError
from curate.models import MODELS, build_model, channels_last_is_safe
from curate.pools import open_pool
from curate.spec import InputSpec
from curate.teachers import Teacher, load_teacher, save_teacher
from train.augment import random_crop_flip
from train.data import make_loader
from train.evaluate import predictions
from train.losses import LOSSES, DistillLoss
from train.shards import CuratedShards, EpochPlan, ReaderState, ShardBatches
from train.teacher import cosine_with_warmup

WEIGHTINGS = ("none", "loss", "sample")


@dataclass
class DistillConfig:
    shards: Path
    out: Path
    student: str = "resnet8"
    width: float = 0.5
    teacher: Path | None = None  # online: the teacher labels every augmented view
    loss: str = "kd"
    temperature: float = 4.0
    hard_weight: float = 0.0
    feature_weight: float = 0.0
    weighting: str = "loss"  # the shards' weight column: in the loss, as sampling probabilities, or ignored
    steps: int | None = None
    epochs: float | None = None  # used when steps is not given
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # default 0.05 for SGD, 2e-3 for AdamW
    weight_decay: float = 5e-4
    warmup_steps: int | None = None  # default 3% of the steps
    crop_padding: int = 2
    flip: bool = False
    mixup: float = 0.0  # Beta(alpha, alpha) mixing between samples; needs --teacher for fresh targets
    eval_dataset: str | None = None
    eval_root: Path | None = None
    eval_every: int = 500
    eval_limit: int | None = None
    log_every: int = 50
    ckpt_every: int = 500
    keep: int = 3
    window_groups: int = 8
    lanes: int = 2  # reading streams per rank, interleaved batch by batch: part of the data order
    workers: int | None = None  # reader processes, speed only (resume may change it); default: 0 on CPU, 4 on CUDA
    device: str = "auto"
    amp: bool = True  # CUDA only
    compile: bool = False
    seed: int = 0

    def resolved(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}


# Options that change only speed: a --resume may change them and still continue bit for bit.
SPEED_ONLY = {"workers"}


def reader_workers(cfg: DistillConfig, device: torch.device) -> int:
    """On CPU the training step already uses every core and reading a batch in-process costs about 1% of
    it, so worker processes would only compete with it (benchmarks/train_throughput.py); on CUDA they keep
    the GPU fed."""
    if cfg.workers is not None:
        return cfg.workers
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


# -- factories -------------------------------------------------------------------------------------------------


def build_student(cfg: DistillConfig, shards: CuratedShards) -> torch.nn.Module:
    if cfg.student not in MODELS:
        raise UserError(f"unknown student {cfg.student!r}: choose one of {', '.join(sorted(MODELS))}")
    channels, size, _ = shards.image_shape
    return build_model(cfg.student, shards.num_classes, channels, size, cfg.width)


def build_teacher(cfg: DistillConfig, shards: CuratedShards, device: torch.device) -> Teacher | None:
    if cfg.teacher is None:
        return None
    teacher = load_teacher(cfg.teacher, device=device)
    if teacher.fingerprint != shards.manifest["teacher"]["fingerprint"]:
        raise UserError(f"{cfg.teacher} is not the teacher that scored these shards: pass the same teacher file")
    teacher.model.eval()
    return teacher


def build_optimizer(cfg: DistillConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim > 1]  # no weight decay on BN and biases
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr or 0.05, momentum=0.9, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr or 2e-3)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}: choose sgd or adamw")


def total_steps(cfg: DistillConfig, shards: CuratedShards) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_epoch = max(1, shards.rows // cfg.batch_size)
    return max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))


class Evaluator:
    """Accuracy on a labeled pool and agreement with the teacher's predictions there."""

    def __init__(self, cfg: DistillConfig, spec: InputSpec, num_classes: int, teacher: Teacher | None,
                 device: torch.device) -> None:
        pool = open_pool(cfg.eval_dataset, cfg.eval_root)
        if pool.class_names and len(pool.class_names) != num_classes:
            raise UserError(f"--eval {cfg.eval_dataset} has {len(pool.class_names)} classes, the teacher {num_classes}: "
                            "evaluate on the teacher's task")
        indices = None
        if cfg.eval_limit is not None and cfg.eval_limit < len(pool):
            indices = np.sort(np.random.default_rng(0).choice(len(pool), cfg.eval_limit, replace=False))
        self.loader = make_loader(pool, spec, 512, shuffle=False, seed=0, workers=0, indices=indices)
        self.normalize = spec.normalize()
        self.device = device
        self.teacher_preds = None
        if teacher is not None:
            self.teacher_preds, _ = predictions(teacher.model, self.loader, teacher.spec.normalize(), device)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        preds, labels = predictions(model, self.loader, self.normalize, self.device)
        result = {"accuracy": float((preds == labels).float().mean())}
        if self.teacher_preds is not None:
            result["agreement"] = float((preds == self.teacher_preds).float().mean())
        return result


# -- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_paths(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*.pt"))


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    write_atomically(out / f"ckpt-{step:08d}.pt", lambda path: torch.save(state, path))
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_latest_checkpoint(cfg: DistillConfig) -> dict[str, Any] | None:
    for path in reversed(checkpoint_paths(cfg.out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint cut short is skipped for the one before it
            continue
        changed = {k for k, v in cfg.resolved().items() if state["config"].get(k) != v and k not in SPEED_ONLY}
        if changed:
            raise UserError(f"--resume with a changed config ({', '.join(sorted(changed))}): use the same options "
                            f"as the run in {cfg.out}, or a new --out")
        return state
    raise UserError(f"nothing to resume in {cfg.out}: no readable checkpoint (drop --resume to start afresh)")


# -- the loop --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def mix(images: torch.Tensor, alpha: float, seed: int, step: int) -> torch.Tensor:
    """Mixup between samples of the batch (a seeded permutation), one Beta(alpha, alpha) weight per sample,
    the larger share kept by the sample itself."""
    rng = np.random.default_rng([seed, step])
    lam = torch.from_numpy(rng.beta(alpha, alpha, len(images)).astype(np.float32))
    lam = torch.maximum(lam, 1 - lam).to(images.device).view(-1, 1, 1, 1)
    perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
    return lam * images + (1 - lam) * images[perm]


def distill(cfg: DistillConfig, resume: bool = False) -> dict[str, Any]:
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown --loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    if cfg.weighting not in WEIGHTINGS:
        raise UserError(f"unknown --weighting {cfg.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if cfg.mixup > 0 and cfg.teacher is None:
        raise UserError("--mixup needs --teacher: mixed images need fresh teacher targets")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    shards = CuratedShards.open(cfg.shards)
    if cfg.feature_weight > 0 and shards.embedding_dim is None:
        raise UserError("--feature-weight needs teacher embeddings in the shards: export with --embedding")
    spec = InputSpec.from_meta(shards.manifest["input_spec"])
    normalize = spec.normalize()
    steps = total_steps(cfg, shards)

    student = build_student(cfg, shards)
    channels_last = channels_last_is_safe(student, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device, memory_format=memory_format)
    teacher = build_teacher(cfg, shards, device)
    loss_fn = DistillLoss(cfg.loss, cfg.temperature, cfg.hard_weight, cfg.feature_weight,
                          student.classifier.in_features, shards.embedding_dim).to(device)
    optimizer = build_optimizer(cfg, list(student.parameters()) + list(loss_fn.parameters()))
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps if cfg.warmup_steps is not None else
                                   max(1, steps * 3 // 100), steps)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)  # bf16 needs none
    embed = torch.compile(student.features) if cfg.compile else student.features
    evaluator = Evaluator(cfg, spec, shards.num_classes, teacher, device) if cfg.eval_dataset else None

    cfg.out.mkdir(parents=True, exist_ok=True)
    reader, step, history = ReaderState(), 0, []
    if resume:
        state = load_latest_checkpoint(cfg)
        student.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
        reader, step, history = ReaderState(**state["reader"]), state["step"], state["history"]
    elif checkpoint_paths(cfg.out):
        raise UserError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose a new --out")
    (cfg.out / "config.json").write_text(json.dumps(cfg.resolved(), indent=1))

    def checkpoint_state() -> dict[str, Any]:
        return {"model": student.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
                "reader": reader.to_dict(), "step": step, "history": history, "config": cfg.resolved()}

    workers = reader_workers(cfg, device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    metrics_file = open(cfg.out / "metrics.jsonl", "a")
    pending: list[torch.Tensor] = []
    started, seen_since = time.perf_counter(), 0
    columns = [TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("distill", total=steps, completed=step, status="")
        student.train()
        plan_for = functools.partial(EpochPlan, shards, cfg.batch_size, cfg.seed, rank=rank, world=world,
                                     lanes=cfg.lanes, window_groups=cfg.window_groups,
                                     weighted=cfg.weighting == "sample")
        stream = ShardBatches(shards, plan_for, with_embedding=cfg.feature_weight > 0)
        loader = DataLoader(stream, batch_size=None, sampler=itertools.islice(stream.keys(reader), steps - step), num_workers=workers,
                            prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
        for batch in loader:
            generator = step_generator(cfg.seed, step)
            images = random_crop_flip(batch["pixels"].to(device, non_blocking=True), cfg.crop_padding,
                                      cfg.flip, generator)
            inputs = normalize(images)
            if cfg.mixup > 0:
                inputs = mix(inputs, cfg.mixup, cfg.seed, step)
            inputs = inputs.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                if teacher is not None:
                    with torch.inference_mode():
                        targets = teacher.model(inputs).float()
                    targets = targets.clone()
                else:
                    targets = batch["logits"].to(device, non_blocking=True)
                features = embed(inputs)
                logits = student.classifier(features)
                weights = batch["weight"].to(device) if cfg.weighting == "loss" else None
                terms = loss_fn(logits.float(), targets, weights, features,
                                batch["embedding"].to(device) if cfg.feature_weight > 0 else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            reader.epoch, reader.batch = batch["key"][0], batch["key"][1] + 1
            seen_since += len(images)
            pending.append(torch.stack([terms.total.detach(), (logits.argmax(1) == targets.argmax(1)).float().mean()]))
            if step % cfg.log_every == 0 or step == steps:
                loss_value, fit = torch.stack(pending).mean(0).tolist()
                rate = seen_since / (time.perf_counter() - started)
                record = {"step": step, "epoch": reader.epoch, "loss": loss_value, "teacher_fit": fit,
                          "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
                if evaluator is not None and (step % cfg.eval_every == 0 or step == steps):
                    record.update({f"eval_{k}": v for k, v in evaluator(student).items()})
                    student.train()
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                status = f"loss {loss_value:.3f} fit {fit:.3f} {rate:.0f} img/s"
                if "eval_accuracy" in record:
                    status += f" eval {record['eval_accuracy']:.3f}"
                progress.update(task, status=status)
                pending, started, seen_since = [], time.perf_counter(), 0
            progress.update(task, completed=step)
            if step % cfg.ckpt_every == 0 or step == steps:
                save_checkpoint(cfg.out, step, checkpoint_state(), cfg.keep)
    metrics_file.close()

    meta = {**{k: v for k, v in shards.manifest["teacher"]["meta"].items() if k not in ("history", "config")},
            "arch": cfg.student, "width": cfg.width, "distilled_from": shards.manifest["teacher"]["fingerprint"],
            "distill_config": cfg.resolved(), "steps": steps}
    last_eval = next((r for r in reversed(history) if "eval_accuracy" in r), None)
    if last_eval is not None:
        meta["test_accuracy"] = last_eval["eval_accuracy"]
    save_teacher(student.to("cpu", memory_format=torch.contiguous_format), meta, cfg.out / "student.pt",
                 "checkpoint", arch=cfg.student, arch_options={"width": cfg.width})
    plot_curves(history, cfg.out / "curves.png")
    return {"steps": steps, "history": history, "student": cfg.out / "student.pt"}


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
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
