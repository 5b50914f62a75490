"""Weight averaging (``--ema``): the student that is evaluated and saved is an exponential moving average of the
trained weights over the steps, BatchNorm statistics included (torch's ``AveragedModel``).

Why: every step trains on a fresh draw of views (crops, mixup, CutMix, the candidates the student imitates worst),
so the weights after the last step still carry the last steps' noise; an average over roughly the last
``1 / (1 - decay)`` steps keeps what those steps agree on. It costs one in-place interpolation of every weight per
step and no forward pass.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def averaged_student(decay: float, student: torch.nn.Module) -> AveragedModel | None:
    """The moving average of ``student`` for --ema ``decay`` (None: off, the trained weights are the student)."""
    if decay <= 0:
        return None
    return AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
