"""Student-adaptive selection (``--candidates``): every step reads more rows than it trains on, and keeps the
views on which the student is furthest from its teacher, within an equal quota per class of the teacher.

Why: on a pool that holds little of the task, most of a batch is views the student already imitates (the
teacher's few dominant classes), while the rare classes and the boundaries between them are where it is
still wrong. Scoring the candidates costs one forward of the student in inference mode per view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import kd_per_sample


def hardest_within_classes(gap: torch.Tensor, classes: torch.Tensor, keep: int, num_classes: int) -> torch.Tensor:
    """Indices of ``keep`` candidates: each of the ``num_classes`` classes gets a quota of ``keep // num_classes``,
    filled by its largest ``gap``; slots a class cannot fill go to the largest gaps left over, whatever their class.
    """
    order = torch.argsort(gap, descending=True, stable=True)
    onehot = F.one_hot(classes[order], num_classes)
    rank_in_class = (onehot.cumsum(0) * onehot).sum(1) - 1  # 0 for a class's largest gap, 1 for the next...
    within_quota = rank_in_class < keep // num_classes
    # the ones within quota, then the rest, each by gap: a stable sort instead of masks, whose sizes a GPU
    # would have to report to the host
    return order[torch.argsort((~within_quota).to(torch.uint8), stable=True)][:keep]


class HardestViews:
    """Picks the views to train on from a step's candidates (``keep`` of them) by the student's gap to the
    teacher's targets, the distillation loss at ``temperature``."""

    def __init__(self, keep: int, temperature: float, num_classes: int) -> None:
        self.keep, self.temperature, self.num_classes = keep, temperature, num_classes

    @classmethod
    def of(cls, candidates: float, keep: int, temperature: float, num_classes: int) -> HardestViews | None:
        """The picker for --candidates ``candidates`` (None: off, every row read is trained on)."""
        return cls(keep, temperature, num_classes) if candidates > 1 else None

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was_training = student.training
        student.eval()  # its real predictions, and no update of the BatchNorm running statistics
        logits = student(inputs).float()
        student.train(was_training)
        gap = kd_per_sample(logits, targets.float(), self.temperature)
        return hardest_within_classes(gap, targets.argmax(1), self.keep, self.num_classes)
