"""What `train teacher` and `train distill` are asked to do: one dataclass each, every default declared here,
checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from curate.errors import UserError
from curate.models import MODELS
from curate.options import at_least, one_of, positive
from curate.zoo import is_library_name
from train.losses import LOSSES
from train.optim import OPTIMIZERS

# How the shards' weight column is used: in the loss, as sampling probabilities, or not at all.
WEIGHT_USES = ("none", "loss", "sample")
# Options that change only speed: a --resume may change them and still continue bit for bit.
SPEED_ONLY = {"workers"}


@dataclass
class DistillConfig:
    shards: Path = Path("selected")
    out: Path = Path("runs/distill")
    student: str = "resnet8"
    width: float = 0.5
    teacher: Path | None = None  # online: the teacher labels every augmented view
    teacher_weights: Path | None = None  # the state_dict of a library teacher (torchvision:NAME, timm:NAME)
    loss: str = "kd"
    temperature: float = 4.0
    hard_weight: float = 0.0
    feature_weight: float = 0.0
    weighting: str = "loss"  # one of WEIGHT_USES
    steps: int | None = None
    epochs: float | None = None  # used when steps is not given (default 1)
    batch_size: int = 128  # the global batch, split over the ranks
    optimizer: str = "sgd"
    lr: float | None = None  # default 0.05 for SGD, 2e-3 for AdamW
    weight_decay: float = 5e-4
    warmup_steps: int | None = None  # default 3% of the steps
    crop_padding: int | None = None  # default: 2 with an online teacher, 0 on stored logits (see __post_init__)
    flip: bool = False
    affine: float = 0.0  # strength of a random rotation, scale and shear per view; needs --teacher
    mixup: float = 0.0  # Beta(alpha, alpha) mixing between samples; needs --teacher for fresh targets
    cutmix: float = 0.0  # a box of another sample over a Beta(alpha, alpha) share of the area; needs --teacher
    mix_prob: float = 1.0  # chance that a step mixes (with mixup or CutMix); the other steps train on the views
    clean_finish: float = 0.0  # share of the steps, at the end, that train on unmixed views
    balance_views: bool = False  # weight the loss so every class the teacher sees in a batch counts equally
    boundary_views: float = 0.0  # share of each batch stepped toward random teacher classes; needs --teacher
    candidates: float = 1.0  # rows read per row trained on: the student keeps the views it imitates worst
    ema: float = 0.0  # decay of the moving average of the weights that is evaluated and saved (0: the weights)
    holdout: float = 0.0  # fraction of the shard rows kept out of training to measure agreement on
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
    amp: bool | None = None  # None: where bf16 is fast (curate/device.py: fast_bf16)
    compile: bool = False
    seed: int = 0

    @property
    def student_width(self) -> float:
        """The width the student is built at: --width for this project's models; library models (torchvision,
        timm) come at their own size."""
        return 1.0 if is_library_name(self.student) else self.width

    def __post_init__(self) -> None:
        one_of(LOSSES, loss=self.loss)
        one_of(WEIGHT_USES, weighting=self.weighting)
        one_of(OPTIMIZERS, optimizer=self.optimizer)
        if self.student not in MODELS and not is_library_name(self.student):
            raise UserError(f"unknown student {self.student!r}: choose one of {', '.join(sorted(MODELS))}, or a "
                            "library model such as torchvision:mobilenet_v3_small or timm:resnet10t")
        for name in ("affine", "mixup", "cutmix", "boundary_views"):
            if getattr(self, name) > 0 and self.teacher is None:
                raise UserError(f"--{name.replace('_', '-')} needs --teacher: new images need fresh teacher targets")
        if self.crop_padding is None:
            # A stored logit is the teacher's answer for the stored image: a shifted crop keeps the old answer
            # and becomes a slightly wrong target. Measured by KL(teacher || student) on held-out shard rows
            # (half-width resnet8, 3,000 steps): 0.0269 -> 0.0223 on the teacher's own images and
            # 0.0916 -> 0.0691 on a no-fashion related selection when the crop goes. An online teacher
            # labels each crop itself, so there crops only add views.
            self.crop_padding = 2 if self.teacher is not None else 0
        if not 0 < self.mix_prob <= 1:
            raise UserError(f"--mix-prob {self.mix_prob} is not a probability in (0, 1]: try 0.5 (1: every step "
                            "mixes)")
        if not 0 <= self.clean_finish < 1:
            raise UserError(f"--clean-finish {self.clean_finish} is not a share of the steps in [0, 1): try 0.25")
        if (self.mix_prob < 1 or self.clean_finish > 0) and self.mixup <= 0 and self.cutmix <= 0:
            raise UserError("--mix-prob and --clean-finish set how often views are mixed: they need --mixup or "
                            "--cutmix")
        if not 0 <= self.affine <= 1:
            raise UserError(f"--affine {self.affine} is not a strength in [0, 1]: try 0.5 (0 turns it off)")
        if not 0 <= self.boundary_views <= 1:
            raise UserError(f"--boundary-views {self.boundary_views} is not a share of the batch in [0, 1]: try 0.25")
        at_least(1, steps=self.steps, batch_size=self.batch_size, eval_every=self.eval_every,
                 eval_limit=self.eval_limit, log_every=self.log_every, ckpt_every=self.ckpt_every, keep=self.keep,
                 window_groups=self.window_groups, lanes=self.lanes, candidates=self.candidates)
        at_least(0, warmup_steps=self.warmup_steps, workers=self.workers, crop_padding=self.crop_padding,
                 mixup=self.mixup, cutmix=self.cutmix, hard_weight=self.hard_weight, feature_weight=self.feature_weight,
                 weight_decay=self.weight_decay)
        if not 0 <= self.ema < 1:
            raise UserError(f"--ema {self.ema} is not a decay in [0, 1): try 0.999 (0 turns averaging off)")
        if not 0 <= self.holdout < 1:
            raise UserError(f"--holdout {self.holdout} is not a fraction of the rows in [0, 1): try 0.05")
        positive(epochs=self.epochs, width=self.width, temperature=self.temperature, lr=self.lr)

    def total_steps(self, rows: int) -> int:
        """--steps, else --epochs (default 1) over ``rows`` rows."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs or 1.0) * max(1, rows // self.batch_size)))

    def resolved(self) -> dict[str, Any]:
        """The options as JSON values: what config.json and every checkpoint record."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}


@dataclass
class TeacherConfig:
    dataset: str
    out: Path = Path("teacher.pt")
    arch: str = "resnet8"
    width: float = 1.0
    root: Path | None = None
    test_dataset: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    crop_padding: int = 2
    flip: bool = True
    limit: int | None = None
    workers: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: where bf16 is fast (curate/device.py: fast_bf16)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in MODELS:
            raise UserError(f"unknown architecture {self.arch!r}: choose one of {', '.join(MODELS)}")
        at_least(1, epochs=self.epochs, batch_size=self.batch_size, limit=self.limit, num_classes=self.num_classes,
                 in_channels=self.in_channels, image_size=self.image_size)
        at_least(0, crop_padding=self.crop_padding, workers=self.workers, warmup_epochs=self.warmup_epochs,
                 label_smoothing=self.label_smoothing, weight_decay=self.weight_decay)
        positive(width=self.width, lr=self.lr)

    def test_pool_name(self) -> str:
        if self.test_dataset:
            return self.test_dataset
        if self.dataset.endswith(".toml"):
            raise UserError("a mixed training pool has no obvious test split: pass --test-dataset, e.g. "
                            "fashion-mnist:test")
        from curate.pools import POOL_KINDS  # here, not at import: `train --help` need not load every pool kind

        kind = self.dataset.partition(":")[0]
        if kind in POOL_KINDS and "split" not in POOL_KINDS[kind].options:
            raise UserError(f"{kind} has no test split: pass --test-dataset with a labeled pool of the same classes")
        return f"{kind}:test"
