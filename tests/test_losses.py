"""Each distillation loss against a value computed by hand (two classes, teacher probabilities 3:1)."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import LOSSES, DistillLoss

STUDENT = torch.tensor([[0.0, 0.0]])  # p_student = (1/2, 1/2)
TEACHER = torch.tensor([[math.log(3.0), 0.0]])  # p_teacher = (3/4, 1/4)

HAND = {
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2)
    "kd": 0.75 * math.log(1.5) + 0.25 * math.log(0.5),
    # -(3/4 ln 1/2 + 1/4 ln 1/2)
    "soft-ce": math.log(2.0),
    # m = (5/8, 3/8): 1/2 [KL(p_t || m) + KL(p_s || m)]
    "js": 0.5 * ((0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))
                 + (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))),
    # mean over the two logits of the squared difference
    "mse": math.log(3.0) ** 2 / 2,
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_loss_matches_the_hand_computed_value(kind: str) -> None:
    assert LOSSES[kind](STUDENT, TEACHER, 1.0).item() == pytest.approx(HAND[kind], rel=1e-5)


@pytest.mark.parametrize("kind", ["kd", "soft-ce", "js"])
def test_temperature_softens_both_sides_and_scales_by_its_square(kind: str) -> None:
    # at T = 2 the logits (2 ln 3, 0) give the same 3:1 probabilities, and the value is multiplied by 4
    assert LOSSES[kind](STUDENT, 2 * TEACHER, 2.0).item() == pytest.approx(4 * HAND[kind], rel=1e-5)


def test_per_sample_weights_and_hard_label_term() -> None:
    student = torch.cat([STUDENT, TEACHER])  # the second row matches its teacher exactly: KD 0
    teacher = torch.cat([TEACHER, TEACHER])
    loss = DistillLoss("kd", temperature=1.0, hard_weight=0.5)
    terms = loss(student, teacher, weights=torch.tensor([3.0, 1.0]))
    assert terms.distill.item() == pytest.approx(3 * HAND["kd"] / 4, rel=1e-5)
    # cross-entropy to the teacher's argmax (class 0): ln 2 for row one, ln(4/3) for row two
    hard = (3 * math.log(2.0) + math.log(4 / 3)) / 4
    assert terms.hard.item() == pytest.approx(hard, rel=1e-5)
    assert terms.total.item() == pytest.approx(3 * HAND["kd"] / 4 + 0.5 * hard, rel=1e-5)


def test_feature_matching_learns_a_projection_to_the_teacher_embedding() -> None:
    torch.manual_seed(0)
    features, embedding = torch.randn(64, 8), torch.randn(64, 5)
    target = features @ torch.randn(8, 5)  # reachable by a linear map
    loss = DistillLoss("kd", feature_weight=1.0, student_dim=8, teacher_dim=5)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        terms = loss(torch.zeros(64, 2), torch.zeros(64, 2), student_features=features, teacher_embedding=target)
        first = first if first is not None else terms.feature.item()
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    assert terms.feature.item() < 0.05 * first
    unrelated = loss(torch.zeros(64, 2), torch.zeros(64, 2), student_features=features, teacher_embedding=embedding)
    assert unrelated.feature.item() > 10 * terms.feature.item()
