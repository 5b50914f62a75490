"""`train`: the command line of the training stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curate.errors import UserError, run_app
from curate.models import MODELS

app = typer.Typer(
    help="Train teachers on labeled pools and distil students from curated shards.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _group() -> None:
    """Train teachers on labeled pools and distil students from curated shards."""


@app.command()
def teacher(
    dataset: Annotated[str, typer.Option(help="labeled pool to train on: KIND, KIND:SPLIT or a .toml mix")],
    out: Annotated[Path, typer.Option(help="where to write the teacher checkpoint")] = Path("teacher.pt"),
    arch: Annotated[str, typer.Option(help=f"architecture: {', '.join(MODELS)}")] = "resnet8",
    width: Annotated[float, typer.Option(help="channel-width multiplier")] = 1.0,
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    test_dataset: Annotated[str | None, typer.Option(help="test pool (default KIND:test)")] = None,
    num_classes: Annotated[int | None, typer.Option(help="class count, for pools that do not name their classes")] = None,
    in_channels: Annotated[int | None, typer.Option(help="input channels (default: the dataset's)")] = None,
    image_size: Annotated[int | None, typer.Option(help="input side in pixels (default: the dataset's)")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training set (6 take a resnet8 past 90% on Fashion-MNIST)")] = 6,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(help="peak SGD learning rate (cosine schedule with warm-up)")] = 0.1,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    crop_padding: Annotated[int, typer.Option(help="random-crop padding in pixels (0: no crop)")] = 2,
    flip: Annotated[bool, typer.Option(help="random horizontal flips (turn off for digits and text)")] = True,
    limit: Annotated[int | None, typer.Option(help="train on a seeded random subset of this many samples")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: int = 0,
) -> None:
    """Train a classifier on a labeled pool and save it as a teacher checkpoint (test accuracy in its meta).

    Example: train teacher --dataset fashion-mnist --arch resnet8 --out teacher.pt
    """
    from train.teacher import TeacherConfig, train_teacher  # heavy imports only when training

    cfg = TeacherConfig(dataset=dataset, out=out, arch=arch, width=width, root=root, test_dataset=test_dataset,
                        num_classes=num_classes, in_channels=in_channels, image_size=image_size, epochs=epochs,
                        batch_size=batch_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                        crop_padding=crop_padding, flip=flip, limit=limit, workers=workers, device=device, seed=seed)
    if arch not in MODELS:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(MODELS)}")
    meta = train_teacher(cfg)
    typer.echo(f"test accuracy {meta['test_accuracy']:.4f} in {meta['train_seconds']:.0f} s; saved {out}")


@app.command()
def distill(
    shards: Annotated[Path, typer.Option(help="curated shard folder (from curate export)")] = Path("selected"),
    out: Annotated[Path, typer.Option(help="run folder: metrics.jsonl, curves.png, checkpoints, student.pt")] = Path("runs/distill"),
    student: Annotated[str, typer.Option(help=f"student architecture: {', '.join(MODELS)}")] = "resnet8",
    width: Annotated[float, typer.Option(help="student channel-width multiplier")] = 0.5,
    teacher: Annotated[Path | None, typer.Option(help="run this teacher on every augmented view (online) "
                                                      "instead of using the stored logits")] = None,
    loss: Annotated[str, typer.Option(help="kd, soft-ce, js or mse")] = "kd",
    temperature: Annotated[float, typer.Option(help="softmax temperature of kd/soft-ce/js")] = 4.0,
    hard_weight: Annotated[float, typer.Option(help="weight of cross-entropy to the teacher's argmax")] = 0.0,
    feature_weight: Annotated[float, typer.Option(help="weight of matching the teacher embedding "
                                                       "(needs shards exported with --embedding)")] = 0.0,
    weighting: Annotated[str, typer.Option(help="use the weight column: loss (weighted loss), sample "
                                                 "(sampling probabilities) or none")] = "loss",
    steps: Annotated[int | None, typer.Option(min=1, help="optimiser steps (default: --epochs)")] = None,
    epochs: Annotated[float | None, typer.Option(help="passes over the shards when --steps is not given (default 1)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw")] = "sgd",
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default 0.05 SGD, 2e-3 AdamW)")] = None,
    weight_decay: float = 5e-4,
    warmup_steps: Annotated[int | None, typer.Option(help="linear warm-up steps (default 3% of the steps)")] = None,
    crop_padding: Annotated[int, typer.Option(help="random-crop padding in pixels (0: none)")] = 2,
    flip: Annotated[bool, typer.Option(help="random horizontal flips (only where the task allows)")] = False,
    mixup: Annotated[float, typer.Option(help="mixup Beta(alpha, alpha) between samples (needs --teacher)")] = 0.0,
    eval_dataset: Annotated[str | None, typer.Option("--eval", help="labeled pool to evaluate on, e.g. fashion-mnist:test")] = None,
    eval_root: Annotated[Path | None, typer.Option(help="data folder of --eval")] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="evaluate every N steps (on a log step)")] = 500,
    eval_limit: Annotated[int | None, typer.Option(help="evaluate on a seeded subset of this many samples")] = None,
    log_every: Annotated[int, typer.Option(min=1, help="write metrics every N steps")] = 50,
    ckpt_every: Annotated[int, typer.Option(min=1, help="checkpoint every N steps")] = 500,
    keep: Annotated[int, typer.Option(min=1, help="checkpoints kept")] = 3,
    record_rows: Annotated[bool, typer.Option(help="write (step, epoch, row) of every sample trained on to "
                                                   "rows-rank*.i64 in --out (an audit of the data order)")] = False,
    lanes: Annotated[int, typer.Option(min=1, help="reading streams per rank (part of the data order; "
                                                   "match --workers for locality)")] = 2,
    workers: Annotated[int | None, typer.Option(min=0, help="processes reading shards; speed only "
                                                            "(default 0 on CPU, 4 on CUDA)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    compile: Annotated[bool, typer.Option(help="torch.compile the student")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    seed: int = 0,
) -> None:
    """Distil a student from curated shards, streaming; resumable exactly with --resume.

    Example: train distill --shards selected/ --student resnet8 --width 0.5 --steps 3000 --eval fashion-mnist:test
    On N processes (GPUs, or CPU with gloo): torchrun --nproc_per_node N -m train distill ... (--batch-size is
    the global batch; add torchrun's --nnodes/--rdzv-endpoint for several machines).
    """
    import torch.distributed as dist

    from train.distill import DistillConfig, distill as run_distill

    cfg = DistillConfig(shards=shards, out=out, student=student, width=width, teacher=teacher, loss=loss,
                        temperature=temperature, hard_weight=hard_weight, feature_weight=feature_weight,
                        weighting=weighting, steps=steps, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                        lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, crop_padding=crop_padding,
                        flip=flip, mixup=mixup, eval_dataset=eval_dataset, eval_root=eval_root, eval_every=eval_every,
                        eval_limit=eval_limit, log_every=log_every, ckpt_every=ckpt_every, keep=keep,
                        record_rows=record_rows, lanes=lanes, workers=workers, device=device, compile=compile,
                        seed=seed)
    try:
        result = run_distill(cfg, resume=resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) > 0:  # the summary once, from rank 0
        return
    last = result["history"][-1] if result["history"] else {}
    summary = f"{result['steps']} steps; saved {result['student']}"
    if "eval_accuracy" in last:
        summary += f"; eval accuracy {last['eval_accuracy']:.4f}"
    typer.echo(summary)


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="teacher or student: checkpoint, TorchScript, .pt2 or pickled module")],
    dataset: Annotated[str, typer.Option(help="labeled pool, e.g. fashion-mnist:test")],
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    model_meta: Annotated[Path | None, typer.Option(help="JSON meta overriding or supplying the model's input spec")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow a pickled module (unpickling runs code from the file)")] = False,
    batch_size: int = 512,
    workers: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Accuracy of a model on a labeled pool, overall and per class.

    Example: train eval --model teacher.pt --dataset fashion-mnist:test
    """
    from train.evaluate import evaluate_model

    result = evaluate_model(model, dataset, root, model_meta, trust_pickle, batch_size, workers, device)
    table = Table(title=f"{model.name} on {dataset}: accuracy {result['accuracy']:.4f} ({result['samples']} samples)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("samples", justify="right")
    for name, (acc, count) in result["per_class"].items():
        table.add_row(name, f"{acc:.4f}", str(count))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="train")
