"""`train`: the command line of the training stage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curate.atomic import check_writable, write_atomically
from curate.errors import UserError, run_app
from curate.models import MODELS
from curate.options import config_from
from train.config import DistillConfig, TeacherConfig

AMP_HELP = ("bf16 autocast (fp16 on GPUs without bf16); default: on CUDA and on CPUs with bf16 units "
            "(AMX/AVX512-BF16), where it is faster, off elsewhere")

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
    out: Annotated[Path, typer.Option(help="where to write the teacher checkpoint")] = TeacherConfig.out,
    arch: Annotated[str, typer.Option(help=f"architecture: {', '.join(MODELS)}")] = TeacherConfig.arch,
    width: Annotated[float, typer.Option(help="channel-width multiplier")] = TeacherConfig.width,
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    test_dataset: Annotated[str | None, typer.Option(help="test pool (default KIND:test)")] = None,
    num_classes: Annotated[int | None, typer.Option(help="class count, for pools that do "
                                                         "not name their classes")] = None,
    in_channels: Annotated[int | None, typer.Option(help="input channels (default: the dataset's)")] = None,
    image_size: Annotated[int | None, typer.Option(help="input side in pixels (default: the dataset's)")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the training set (6 take a resnet8 past 90% on "
                                        "Fashion-MNIST)")] = TeacherConfig.epochs,
    batch_size: int = TeacherConfig.batch_size,
    lr: Annotated[float, typer.Option(help="peak SGD learning rate (cosine schedule with warm-up)")] = TeacherConfig.lr,
    weight_decay: float = TeacherConfig.weight_decay,
    label_smoothing: float = TeacherConfig.label_smoothing,
    crop_padding: Annotated[int, typer.Option(
        help="random-crop padding in pixels (0: no crop)")] = TeacherConfig.crop_padding,
    flip: Annotated[bool, typer.Option(help="random horizontal flips (turn off for "
                                            "digits and text)")] = TeacherConfig.flip,
    limit: Annotated[int | None, typer.Option(help="train on a seeded random subset of this many samples")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes")] = TeacherConfig.workers,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = TeacherConfig.device,
    amp: Annotated[bool | None, typer.Option(help=AMP_HELP)] = None,
    seed: int = TeacherConfig.seed,
) -> None:
    """Train a classifier on a labeled pool and save it as a teacher checkpoint (test accuracy in its meta).

    Example: train teacher --dataset fashion-mnist --arch resnet8 --out teacher.pt
    """
    from train.teacher import train_teacher  # heavy imports only when training

    meta = train_teacher(config_from(TeacherConfig, locals()))
    typer.echo(f"test accuracy {meta['test_accuracy']:.4f} in {meta['train_seconds']:.0f} s; saved {out}")


@app.command()
def distill(
    shards: Annotated[Path, typer.Option(help="curated shard folder (from curate export)")] = DistillConfig.shards,
    out: Annotated[Path, typer.Option(help="run folder: metrics.jsonl, curves.png, "
                                           "checkpoints, student.pt")] = DistillConfig.out,
    student: Annotated[str, typer.Option(help=f"student architecture: {', '.join(MODELS)}; or torchvision:NAME, "
                                              "timm:NAME (randomly initialised)")] = DistillConfig.student,
    width: Annotated[float, typer.Option(help="student channel-width multiplier (this project's models; library "
                                              "models come at their own size)")] = DistillConfig.width,
    teacher: Annotated[Path | None, typer.Option(help="run this teacher on every augmented view (online) "
                                                      "instead of using the stored logits: the file, or the "
                                                      "library name, that scored the pool")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="state_dict of a library --teacher (as given to "
                                                              "curate score)")] = None,
    loss: Annotated[str, typer.Option(help="kd, soft-ce, js or mse")] = DistillConfig.loss,
    temperature: Annotated[float, typer.Option(
        help="softmax temperature of kd/soft-ce/js")] = DistillConfig.temperature,
    hard_weight: Annotated[float, typer.Option(
        help="weight of cross-entropy to the teacher's argmax")] = DistillConfig.hard_weight,
    feature_weight: Annotated[float, typer.Option(
        help="weight of matching the teacher's penultimate features through a learned projection: with "
             "--teacher its features on each view, else the embedding stored with the shards (export --embedding)"
    )] = DistillConfig.feature_weight,
    weighting: Annotated[str, typer.Option(help="use the weight column: loss (weighted loss), sample "
                                                 "(sampling probabilities) or none")] = DistillConfig.weighting,
    steps: Annotated[int | None, typer.Option(help="optimiser steps (default: --epochs)")] = None,
    epochs: Annotated[float | None, typer.Option(help="passes over the shards when --steps "
                                                      "is not given (default 1)")] = None,
    batch_size: Annotated[int, typer.Option()] = DistillConfig.batch_size,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw")] = DistillConfig.optimizer,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default 0.05 SGD, 2e-3 AdamW)")] = None,
    weight_decay: float = DistillConfig.weight_decay,
    warmup_steps: Annotated[int | None, typer.Option(help="linear warm-up steps (default 3% of the steps)")] = None,
    crop_padding: Annotated[int | None, typer.Option(
        help="random-crop padding in pixels, 0: none (default: 2 with --teacher, which labels each crop; 0 on "
             "stored logits, which belong to the uncropped image)")] = DistillConfig.crop_padding,
    flip: Annotated[bool, typer.Option(help="random horizontal flips (only where "
                                            "the task allows)")] = DistillConfig.flip,
    affine: Annotated[float, typer.Option(
        help="strength in [0, 1] of a random affine warp of every view: rotation up to 30 degrees x it, scale "
             "between 2**(-it/2) and 2**(it/2), shear up to 0.3 x it; views the pool does not hold, labelled by the "
             "teacher (needs --teacher)")] = DistillConfig.affine,
    mixup: Annotated[float, typer.Option(help="mixup Beta(alpha, alpha) between samples "
                                              "(needs --teacher)")] = DistillConfig.mixup,
    cutmix: Annotated[float, typer.Option(help="CutMix Beta(alpha, alpha): a box of another sample over that share "
                                               "of the area (needs --teacher; with --mixup, one of the two per "
                                               "step)")] = DistillConfig.cutmix,
    mix_prob: Annotated[float, typer.Option(
        help="chance in (0, 1] that a step mixes (with --mixup or --cutmix); the other steps train on the pool's "
             "own views")] = DistillConfig.mix_prob,
    clean_finish: Annotated[float, typer.Option(
        help="share in [0, 1) of the steps, at the end, trained without mixing, so the student ends on the "
             "pool's own views, as it is tested (with --mixup or --cutmix; 0: mix to the end)")]
    = DistillConfig.clean_finish,
    balance_views: Annotated[bool, typer.Option(
        help="weight the loss so that every class the teacher sees in a batch (after augmentation and mixing) "
             "counts equally")] = DistillConfig.balance_views,
    boundary_views: Annotated[float, typer.Option(
        help="share of each batch moved by 3 signed-gradient steps toward a random class of the teacher, then "
             "labelled by it: views across its decision boundaries, every class equally often (needs "
             "--teacher)")] = DistillConfig.boundary_views,
    candidates: Annotated[float, typer.Option(
        help="student-adaptive selection: read this many rows per row trained on and keep, within an equal quota "
             "per teacher class, the views where the student is furthest from the teacher (1: off; costs one "
             "student forward per candidate)")] = DistillConfig.candidates,
    ema: Annotated[float, typer.Option(
        help="evaluate and save a moving average of the student's weights with this decay per step, e.g. 0.999, "
             "warmed up as (1 + n) / (10 + n) after n steps (0: the trained weights)")] = DistillConfig.ema,
    holdout: Annotated[float, typer.Option(
        help="fraction of the shard rows kept out of training (the same rows for every seed and recipe); "
             "agreement with the teacher there is logged at every evaluation: a label-free way to compare "
             "recipes")] = DistillConfig.holdout,
    eval_dataset: Annotated[str | None, typer.Option("--eval", help="labeled pool to evaluate on, "
                                                                    "e.g. fashion-mnist:test")] = None,
    eval_root: Annotated[Path | None, typer.Option(help="data folder of --eval")] = None,
    eval_every: Annotated[int, typer.Option(help="evaluate every N steps (on a log step)")] = DistillConfig.eval_every,
    eval_limit: Annotated[int | None, typer.Option(help="evaluate on a seeded subset of this many samples")] = None,
    log_every: Annotated[int, typer.Option(help="write metrics every N steps")] = DistillConfig.log_every,
    ckpt_every: Annotated[int, typer.Option(help="checkpoint every N steps")] = DistillConfig.ckpt_every,
    keep: Annotated[int, typer.Option(help="checkpoints kept")] = DistillConfig.keep,
    record_rows: Annotated[bool, typer.Option(
        help="write (step, epoch, row) of every sample trained on to rows-rank*.i64 in --out (an audit of the data "
             "order)")] = DistillConfig.record_rows,
    lanes: Annotated[int, typer.Option(help="reading streams per rank (part of the data order; "
                                            "match --workers for locality)")] = DistillConfig.lanes,
    workers: Annotated[int | None, typer.Option(help="processes reading shards; speed only "
                                                            "(default 0 on CPU, 4 on CUDA)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = DistillConfig.device,
    amp: Annotated[bool | None, typer.Option(help=AMP_HELP)] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the student")] = DistillConfig.compile,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    seed: int = DistillConfig.seed,
) -> None:
    """Distil a student from curated shards, streaming; resumable exactly with --resume.

    Example: train distill --shards selected/ --student resnet8 --width 0.5 --steps 3000 --eval fashion-mnist:test
    On N processes (GPUs, or CPU with gloo): torchrun --nproc_per_node N -m train distill ... (--batch-size is
    the global batch; add torchrun's --nnodes/--rdzv-endpoint for several machines).
    """
    import torch.distributed as dist

    from train.distill import distill as run_distill

    cfg = config_from(DistillConfig, locals())
    try:
        result = run_distill(cfg, resume=resume)
    except RuntimeError as err:
        if not dist.is_initialized() or not lost_peer(err):
            raise
        # another process of the job failed (its one-line error is above it): stop with one line too
        raise UserError(f"process {dist.get_rank()} stops: another process of this torchrun job failed "
                        "(its error is above)") from None
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
    dataset: Annotated[str | None, typer.Option(help="labeled pool, e.g. fashion-mnist:test")] = None,
    shards: Annotated[Path | None, typer.Option(help="instead of --dataset: a curated folder, whose held-out rows "
                                                     "(--holdout) are compared with the teacher's stored "
                                                     "logits")] = None,
    holdout: Annotated[float, typer.Option(help="with --shards: the --holdout the student was distilled "
                                                "with")] = 0.05,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures to this JSON "
                                                                 "file")] = None,
    root: Annotated[Path | None, typer.Option(help="data folder (default $CURATE_DATA or ./data)")] = None,
    model_meta: Annotated[Path | None, typer.Option(help="JSON meta overriding or supplying "
                                                         "the model's input spec")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="allow a pickled module (unpickling "
                                                    "runs code from the file)")] = False,
    batch_size: int = 512,
    workers: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Accuracy of a model on a labeled pool, overall and per class; or, with --shards, how closely a student
    matches its teacher on a curated folder's held-out rows (no label needed).

    Example: train eval --model teacher.pt --dataset fashion-mnist:test
    """
    from train.evaluate import evaluate_model, held_out_figures

    if (dataset is None) == (shards is None):
        raise UserError("give --dataset (accuracy on a labeled pool) or --shards (agreement on held-out rows)")
    if json_out is not None:
        check_writable(json_out)
    if shards is not None:
        figures = held_out_figures(model, shards, holdout, model_meta, trust_pickle, device)
        table = Table(title=f"{model.name} against the teacher on {shards}'s held-out rows")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in figures.items():
            table.add_row(name, f"{value:.4f}")
        Console().print(table)
        if json_out is not None:
            write_atomically(json_out, lambda path: path.write_text(json.dumps(figures, indent=1)))
        return
    result = evaluate_model(model, dataset, root, model_meta, trust_pickle, batch_size, workers, device)
    table = Table(title=f"{model.name} on {dataset}: accuracy {result['accuracy']:.4f} ({result['samples']} samples)")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("samples", justify="right")
    for name, (acc, count) in result["per_class"].items():
        table.add_row(name, f"{acc:.4f}", str(count))
    Console().print(table)
    if json_out is not None:
        write_atomically(json_out, lambda path: path.write_text(json.dumps(result, indent=1)))


def lost_peer(err: RuntimeError) -> bool:
    """A collective broke because another rank's process ended (gloo and NCCL word it differently)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator"))


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv, prog_name="train")
