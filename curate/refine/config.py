"""Options of `curate refine`, checked when built (no torch import: the command line reads the defaults)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from curate.errors import UserError
from curate.options import at_least, positive


@dataclass
class RefineConfig:
    shards: Path
    teacher: Path
    out: Path = Path("refined")
    share: float = 0.25  # of every class's rows, those whose statistics fall furthest from the teacher's
    steps: int = 20  # optimiser steps per refined image
    # Adam's step in pixel units (range [0, 1]): at 0.02, 20 steps turned real garments into textures on the
    # Fashion-MNIST teacher's pool; at 0.005 the images kept their shapes while the deviation still fell 3.6 -> 1.0.
    lr: float = 0.005
    class_weight: float = 1.0  # weight of the cross-entropy to the row's class beside the BatchNorm deviation
    batch_size: int = 256
    device: str = "auto"
    teacher_weights: Path | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise UserError(f"--share {self.share} is not a share of the rows in (0, 1]: try 0.25")
        at_least(1, steps=self.steps, batch_size=self.batch_size)
        at_least(0, class_weight=self.class_weight)
        positive(lr=self.lr)
