"""Distillation losses: per-sample terms comparing student and teacher logits, combined with weights.

Each ``*_per_sample`` function returns one value per row, so per-sample weights (importance or class
weights from the selection) apply the same way to all of them: ``sum(w * loss) / sum(w)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2 so gradients keep their scale as T grows."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1) * temperature**2


def soft_ce_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's softened probabilities, times T^2
    (the KD loss plus the teacher's entropy: same gradients, a value that does not go to zero)."""
    p_teacher = F.softmax(teacher / temperature, dim=1)
    return -(p_teacher * F.log_softmax(student / temperature, dim=1)).sum(1) * temperature**2


def js_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Jensen-Shannon divergence between the softened distributions, times T^2 (bounded, symmetric)."""
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return 0.5 * (kl_pm + kl_qm) * temperature**2


def mse_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean squared difference of the raw logits (temperature does not apply)."""
    del temperature
    return (student - teacher).pow(2).mean(1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kd": kd_per_sample,
    "soft-ce": soft_ce_per_sample,
    "js": js_per_sample,
    "mse": mse_per_sample,
}


def balanced_class_weights(teacher_logits: torch.Tensor, cap: float = 5.0) -> torch.Tensor:
    """Per-sample weights that give every class an equal share of the batch's loss, by the teacher's labels of the
    views the student actually sees (augmented, mixed): the inverse of the batch's soft class frequency averaged
    under the sample's own class probabilities, capped at ``cap`` times the mean and scaled to mean 1.

    Why: on a pool that holds little of the task the teacher calls most views one or two classes, and
    augmentation pulls even a balanced selection back toward them; reweighting what is seen restores the
    balance the selection aimed at, without reading anything more."""
    probs = teacher_logits.float().softmax(1)
    frequency = probs.mean(0).clamp_min(1e-6)
    weights = (probs / (len(frequency) * frequency)).sum(1)
    weights = torch.minimum(weights, cap * weights.mean())
    return weights / weights.mean()


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


@dataclass
class LossTerms:
    total: torch.Tensor
    distill: torch.Tensor
    hard: torch.Tensor | None = None
    feature: torch.Tensor | None = None


class DistillLoss(nn.Module):
    """``distill(student, teacher)`` + ``hard_weight`` CE to the teacher's argmax + ``feature_weight`` MSE
    between a learned projection of the student's features and the (normalised) teacher embedding."""

    def __init__(self, kind: str = "kd", temperature: float = 4.0, hard_weight: float = 0.0,
                 feature_weight: float = 0.0, student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.feature_weight = feature_weight
        self.projection = (nn.Linear(student_dim, teacher_dim, bias=False)
                           if feature_weight > 0 and student_dim and teacher_dim else None)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor | None = None,
                student_features: torch.Tensor | None = None,
                teacher_embedding: torch.Tensor | None = None) -> LossTerms:
        distill = weighted_mean(LOSSES[self.kind](student_logits, teacher_logits, self.temperature), weights)
        total = distill
        hard = feature = None
        if self.hard_weight > 0:
            per_sample = F.cross_entropy(student_logits, teacher_logits.argmax(1), reduction="none")
            hard = weighted_mean(per_sample, weights)
            total = total + self.hard_weight * hard
        if self.projection is not None and student_features is not None and teacher_embedding is not None:
            projected = F.normalize(self.projection(student_features), dim=1)
            per_sample = (projected - F.normalize(teacher_embedding, dim=1)).pow(2).sum(1)
            feature = weighted_mean(per_sample, weights)
            total = total + self.feature_weight * feature
        return LossTerms(total, distill, hard, feature)
