"""Boundary views (``--boundary-views``): part of every batch is pushed, by a few signed-gradient steps on the
pixels, toward a class of the teacher drawn uniformly at random, then labelled by the teacher like any view.

Why: when the pool holds little of the task, the teacher calls most of its images one or two classes and
the student never sees what the other classes look like to the teacher. Starting from real pool images
(not noise) and stepping toward a target class creates views on and across the teacher's decision
boundaries, every class equally often: the targeted counterpart of refining images offline, at the cost of
a few teacher forward and backward passes on a fraction of the batch.
"""

from __future__ import annotations

import torch

from curate.device import to_device
from curate.spec import InputSpec
from curate.teachers import Teacher

STEPS = 3  # signed-gradient steps per view
STEP_SIZE = 8 / 255  # per step, in pixel units: three steps move a pixel by at most 0.09 of its range


class BoundaryViews:
    """Moves the first ``fraction`` of a (shuffled) batch of normalised inputs toward random target classes."""

    def __init__(self, teacher: torch.nn.Module, spec: InputSpec, num_classes: int, fraction: float) -> None:
        self.teacher, self.num_classes, self.fraction = teacher, num_classes, fraction
        device = next(teacher.parameters()).device
        std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.step = STEP_SIZE / std  # the pixel step in normalised units, per channel
        self.low, self.high = (0 - mean) / std, (1 - mean) / std  # the valid pixel range, normalised

    @classmethod
    def of(cls, fraction: float, teacher: Teacher | None, spec: InputSpec, num_classes: int) -> BoundaryViews | None:
        """Views for --boundary-views ``fraction`` with the online ``teacher`` (None: off)."""
        return cls(teacher.model, spec, num_classes, fraction) if fraction > 0 and teacher is not None else None

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = round(len(inputs) * self.fraction)
        if count == 0:
            return inputs
        target = to_device(torch.randint(0, self.num_classes, (count,), generator=generator), inputs.device)
        views = inputs[:count].detach().float()
        for _ in range(STEPS):
            views.requires_grad_(True)
            with torch.enable_grad():
                logits = self.teacher(views).float()
                chosen = logits.gather(1, target[:, None])[:, 0]
                rival = logits.scatter(1, target[:, None], float("-inf")).max(1).values
                (grad,) = torch.autograd.grad((chosen - rival).sum(), views)
            views = torch.maximum(torch.minimum(views.detach() + self.step * grad.sign(), self.high), self.low)
        return torch.cat([views.to(inputs.dtype), inputs[count:]])
