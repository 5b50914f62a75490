"""`train distill`: a student learns from curated shards, streaming, resumable to the exact bit.

Read top to bottom: config -> components (shards, student, teacher, loss, optimiser, schedule, eval)
built by small factories -> checkpoint save/restore -> the loop -> outputs. Metrics are gathered as
tensors in the loop and written every ``log_every`` steps, so logging stays out of the hot path.

Exact resume: every random draw of a step (augmentation, mixing) comes from a generator seeded by
(seed, step, rank), and the batch of a step is a pure function of the reader's position (train/shards.py),
so a checkpoint needs model, optimiser, schedule, scaler and each rank's reader (epoch, batch); the global
RNG states are saved and restored as well for anything outside those.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the student and the loss head train as one
DistributedDataParallel module (gloo on CPU, NCCL on GPU). ``--batch-size`` is the global batch, split
evenly over the ranks, so a run takes the same number of steps and samples whatever the number of
processes. Each rank reads its own share of the shards; rank 0 gathers every rank's reader position,
writes the checkpoints, metrics and the student, and hands a checkpoint to the other ranks on --resume.
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from curate.atomic import write_atomically
from curate.device import pick_device
from curate.errors import UserError
from curate.models import MODELS, build_model, channels_last_is_safe
from curate.spec import InputSpec
from curate.teachers import Teacher, load_teacher, save_teacher
from train.augment import random_crop_flip
from train.evaluate import Evaluator
from train.losses import LOSSES, DistillLoss, LossTerms
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
    record_rows: bool = False  # write (step, epoch, row) of every sample trained on, per rank: rows-rank*.i64
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


# -- processes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank ``rank`` of ``world`` (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_ranks(device_name: str) -> Ranks:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); NCCL for CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(cfg: DistillConfig, ranks: Ranks) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (a collective: every rank must call it)."""
    if ranks.world == 1:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def from_main(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (a collective)."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


class DistillStep(torch.nn.Module):
    """Student and loss head as one module, so DistributedDataParallel sees every parameter in one forward."""

    def __init__(self, student: torch.nn.Module, loss_fn: DistillLoss, compile: bool) -> None:
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn
        self.embed = torch.compile(student.features) if compile else student.features

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                teacher_embedding: torch.Tensor | None) -> tuple[LossTerms, torch.Tensor]:
        features = self.embed(inputs)
        logits = self.student.classifier(features)
        return self.loss_fn(logits.float(), targets, weights, features, teacher_embedding), logits


# -- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_paths(out: Path) -> list[Path]:
    return sorted(out.glob("ckpt-*.pt"))


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> None:
    write_atomically(out / f"ckpt-{step:08d}.pt", lambda path: torch.save(state, path))
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
        changed = {k for k, v in cfg.resolved().items() if state["config"].get(k) != v and k not in SPEED_ONLY}
        if changed:
            raise UserError(f"--resume with a changed config ({', '.join(sorted(changed))}): use the same options "
                            f"as the run in {cfg.out}, or a new --out")
        return state
    raise UserError(f"nothing to resume in {cfg.out}: no readable checkpoint (drop --resume to start afresh)")


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


class RowRecorder:
    """``rows-rank<R>.i64``: (step, epoch, row) int64 triples of every sample this rank trained on; a resumed run
    first drops the records of steps it will redo."""

    def __init__(self, out: Path, rank: int, resume_step: int) -> None:
        self.path = out / f"rows-rank{rank:05d}.i64"
        if self.path.exists():
            kept = np.fromfile(self.path, np.int64).reshape(-1, 3)
            kept = kept[kept[:, 0] < resume_step]
            write_atomically(self.path, kept.tofile)
        self.file = open(self.path, "ab")

    def write(self, step: int, epoch: int, rows: torch.Tensor) -> None:
        n = len(rows)
        np.stack([np.full(n, step), np.full(n, epoch), rows.numpy()], axis=1).astype(np.int64).tofile(self.file)

    def close(self) -> None:
        self.file.close()


def read_recorded_rows(out: Path) -> np.ndarray:
    """Every rank's (step, epoch, row) records of a run with --record-rows, stacked."""
    parts = [np.fromfile(path, np.int64).reshape(-1, 3) for path in sorted(out.glob("rows-rank*.i64"))]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)


# -- the loop --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + (rank << 40))


def mix(images: torch.Tensor, alpha: float, seed: int, step: int, rank: int = 0) -> torch.Tensor:
    """Mixup between samples of the batch (a seeded permutation), one Beta(alpha, alpha) weight per sample,
    the larger share kept by the sample itself."""
    rng = np.random.default_rng([seed, step, rank] if rank else [seed, step])
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
    ranks = init_ranks(cfg.device)
    if cfg.batch_size % ranks.world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                        f"{ranks.world} processes: use a multiple of {ranks.world}")
    torch.manual_seed(cfg.seed)
    device = rank_device(cfg, ranks)
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
    evaluator = None
    if cfg.eval_dataset and ranks.main:
        evaluator = Evaluator(cfg.eval_dataset, cfg.eval_root, spec, shards.num_classes, teacher, device,
                              cfg.eval_limit)

    reader, step, history = ReaderState(), 0, []
    if resume:
        state = checkpoint_on_every_rank(cfg, ranks)
        student.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
        reader, step, history = reader_after_resume(state, ranks), state["step"], state["history"]
    elif ranks.main and checkpoint_paths(cfg.out):
        raise UserError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose a new --out")
    step_module = DistillStep(student, loss_fn, cfg.compile)
    if ranks.world > 1:  # after loading: DDP starts every rank from rank 0's weights
        step_module = DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None)
    cfg.out.mkdir(parents=True, exist_ok=True)  # on every rank: each records its rows there
    if ranks.main:
        (cfg.out / "config.json").write_text(json.dumps(cfg.resolved(), indent=1))

    workers = reader_workers(cfg, device)
    plan_for = functools.partial(EpochPlan, shards, cfg.batch_size // ranks.world, cfg.seed, rank=ranks.rank,
                                 world=ranks.world, lanes=cfg.lanes, window_groups=cfg.window_groups,
                                 weighted=cfg.weighting == "sample")
    stream = ShardBatches(shards, plan_for, with_embedding=cfg.feature_weight > 0)

    def checkpoint() -> None:
        """Every rank hands in its reader position; rank 0 writes the checkpoint."""
        # a reader that finished its epoch stands at the next one, so epoch boundaries are recognisable
        position = ReaderState(reader.epoch + 1, 0) if reader.batch == len(stream.plan(reader.epoch)) else reader
        readers = gather(position.to_dict(), ranks)
        if ranks.main:
            state = {"model": student.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
                     "readers": readers, "step": step, "history": history, "config": cfg.resolved()}
            save_checkpoint(cfg.out, step, state, cfg.keep)

    recorder = RowRecorder(cfg.out, ranks.rank, step) if cfg.record_rows else None
    metrics_file = open(cfg.out / "metrics.jsonl", "a") if ranks.main else None
    pending: list[torch.Tensor] = []
    started, seen_since = time.perf_counter(), 0
    columns = [TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not ranks.main) as progress:
        task = progress.add_task("distill", total=steps, completed=step, status="")
        student.train()
        loader = DataLoader(stream, batch_size=None, sampler=itertools.islice(stream.keys(reader), steps - step), num_workers=workers,
                            prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
        for batch in loader:
            generator = step_generator(cfg.seed, step, ranks.rank)
            images = random_crop_flip(batch["pixels"].to(device, non_blocking=True), cfg.crop_padding,
                                      cfg.flip, generator)
            inputs = normalize(images)
            if cfg.mixup > 0:
                inputs = mix(inputs, cfg.mixup, cfg.seed, step, ranks.rank)
            inputs = inputs.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                if teacher is not None:
                    with torch.inference_mode():
                        targets = teacher.model(inputs).float()
                    targets = targets.clone()
                else:
                    targets = batch["logits"].to(device, non_blocking=True)
                weights = batch["weight"].to(device) if cfg.weighting == "loss" else None
                embedding = batch["embedding"].to(device) if cfg.feature_weight > 0 else None
                terms, logits = step_module(inputs, targets, weights, embedding)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if recorder is not None:
                recorder.write(step, batch["key"][0], batch["index"])
            step += 1
            reader.epoch, reader.batch = batch["key"][0], batch["key"][1] + 1
            seen_since += len(images) * ranks.world
            pending.append(torch.stack([terms.total.detach(), (logits.argmax(1) == targets.argmax(1)).float().mean()]))
            if step % cfg.log_every == 0 or step == steps:
                means = torch.stack(pending).mean(0)
                if ranks.world > 1:
                    dist.all_reduce(means)
                    means /= ranks.world
                loss_value, fit = means.tolist()
                rate = seen_since / (time.perf_counter() - started)
                record = {"step": step, "epoch": reader.epoch, "loss": loss_value, "teacher_fit": fit,
                          "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
                if evaluator is not None and (step % cfg.eval_every == 0 or step == steps):
                    record.update({f"eval_{k}": v for k, v in evaluator(student).items()})
                    student.train()
                history.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                status = f"loss {loss_value:.3f} fit {fit:.3f} {rate:.0f} img/s"
                if "eval_accuracy" in record:
                    status += f" eval {record['eval_accuracy']:.3f}"
                progress.update(task, status=status)
                pending, started, seen_since = [], time.perf_counter(), 0
            progress.update(task, completed=step)
            if step % cfg.ckpt_every == 0 or step == steps:
                checkpoint()
    if recorder is not None:
        recorder.close()
    result = {"steps": steps, "history": history, "student": cfg.out / "student.pt"}
    if ranks.world > 1:
        dist.barrier()  # no rank leaves while rank 0 may still need it
    if not ranks.main:
        return result
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
    return result


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
