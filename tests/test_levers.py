"""The levers aimed at class coverage when the pool holds little of the task: CutMix, balanced view weights,
boundary views, student-adaptive selection (``--candidates``), and the held-out rows that compare recipes
without labels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from curate.errors import UserError
from curate.selected import CuratedShards, decode_pixels
from curate.teachers import load_teacher
from train.adaptive import hardest_within_classes
from train.augment import mix, random_affine, step_generator
from train.boundary import BoundaryViews
from train.distill import DistillConfig, Trainer, distill
from train.losses import balanced_class_weights
from train.online import OnlineTeacher
from train.ranks import Ranks
from train.row_audit import read_recorded_rows
from train.shards import EpochPlan, held_out_rows


def constant_images(n: int = 16, size: int = 12) -> torch.Tensor:
    """Sample i is an image filled with the value i, so every output pixel says which sample it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).clone()


def test_cutmix_pastes_one_box_of_one_other_sample_over_at_most_half_the_image() -> None:
    images = constant_images()
    mixed = mix(images, mixup=0.0, cutmix=1.0, seed=3, step=7)
    assert torch.equal(mixed, mix(images, mixup=0.0, cutmix=1.0, seed=3, step=7))  # seeded by (seed, step)
    pasted_somewhere = False
    for i, image in enumerate(mixed[:, 0]):
        others = image != i
        sources = image[others].unique()
        assert len(sources) <= 1  # one other sample
        assert others.float().mean() <= 0.5 + 1e-6  # the sample keeps the larger share
        if others.any():
            pasted_somewhere = True
            rows, cols = others.any(1).nonzero()[:, 0], others.any(0).nonzero()[:, 0]
            box = others[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all() and int(box.sum()) == int(others.sum())  # one filled rectangle
    assert pasted_somewhere


def test_mixup_blends_whole_images_and_both_switch_per_step() -> None:
    images = constant_images()
    blended = mix(images, mixup=0.4, cutmix=0.0, seed=3, step=7)
    assert all(len(b.unique()) == 1 for b in blended[:, 0])  # a blend of two constants is a constant
    kinds = {all(len(b.unique()) == 1 for b in mix(images, 0.4, 1.0, seed=3, step=s)[:, 0]) for s in range(20)}
    assert kinds == {True, False}  # with both, some steps blend and some paste


def test_mix_prob_leaves_the_other_steps_unmixed() -> None:
    images = constant_images()
    mixed_steps = [not torch.equal(mix(images, 0.0, 1.0, seed=3, step=s, prob=0.5), images) for s in range(40)]
    assert 10 <= sum(mixed_steps) <= 30


def test_clean_finish_trains_the_last_steps_on_unmixed_views(selected: Path, teacher_path: Path,
                                                              tmp_path: Path) -> None:
    common = dict(shards=selected, teacher=teacher_path, steps=8, batch_size=16, width=0.25, workers=0, device="cpu")
    mixing = Trainer(DistillConfig(**common, out=tmp_path / "a", cutmix=1.0, clean_finish=0.25), Ranks())
    plain = Trainer(DistillConfig(**common, out=tmp_path / "b"), Ranks())
    shards = CuratedShards.open(selected)
    path = shards.files[0].path
    pixels = torch.from_numpy(decode_pixels(pq.read_table(path, columns=["pixels"])["pixels"][:16],
                                            shards.image_shape, path).copy())

    def same_views(step: int) -> bool:
        return torch.equal(mixing.views(pixels, step, step_generator(0, step)),
                           plain.views(pixels, step, step_generator(0, step)))

    assert [same_views(step) for step in range(8)] == [False] * 6 + [True] * 2
    with pytest.raises(UserError, match="need --mixup or --cutmix"):
        DistillConfig(**common, clean_finish=0.25)
    with pytest.raises(UserError, match="--mix-prob 0.0 is not a probability"):
        DistillConfig(**common, cutmix=1.0, mix_prob=0.0)


def test_random_affine_warps_each_view_by_its_own_draw_and_fills_with_the_background() -> None:
    background = torch.tensor([-0.4])
    views = torch.full((8, 1, 28, 28), -0.4)
    views[:, :, 6:22, 11:17] = 2.0  # an upright bar on the background
    same = random_affine(views, 0.0, background, step_generator(0, 5))
    assert torch.allclose(same, views, atol=1e-5)  # strength 0: the identity
    warped = random_affine(views, 1.0, background, step_generator(0, 5))
    assert torch.equal(warped, random_affine(views, 1.0, background, step_generator(0, 5)))  # seeded by the step
    assert not torch.equal(warped, random_affine(views, 1.0, background, step_generator(0, 6)))
    assert torch.allclose(warped[:, :, 0, 0], background)  # uncovered corners take the background, not 0
    assert warped.min() >= -0.4 - 1e-5 and warped.max() <= 2.0 + 1e-5  # bilinear: no new extremes
    differs = [not torch.allclose(warped[i], views[i], atol=1e-3) for i in range(8)]
    assert all(differs)  # every view moved
    assert len({round(float(w.sum()), 2) for w in warped}) == 8  # each by a draw of its own


def test_hardest_within_classes_fills_equal_quotas_then_the_largest_gaps() -> None:
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0])
    gap = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.05, 0.7])
    chosen = hardest_within_classes(gap, classes, keep=6, num_classes=3)
    # quota 2 per class: class 0 -> 1, 3; class 1 -> 5, 4; class 2 has one candidate -> 6; one slot left -> 7
    assert sorted(chosen.tolist()) == [1, 3, 4, 5, 6, 7]
    assert len(set(chosen.tolist())) == 6


def test_balanced_view_weights_give_every_seen_class_an_equal_share() -> None:
    logits = torch.full((100, 3), -10.0)
    logits[:80, 0] = logits[80:95, 1] = logits[95:, 2] = 10.0  # 80 / 15 / 5 views per class
    weights = balanced_class_weights(logits, cap=100.0)
    shares = torch.stack([weights[:80].sum(), weights[80:95].sum(), weights[95:].sum()])
    assert torch.allclose(shares / shares.sum(), torch.full((3,), 1 / 3), atol=1e-3)
    assert weights.mean().item() == pytest.approx(1.0)
    capped = balanced_class_weights(logits, cap=3.0)
    assert capped.mean().item() == pytest.approx(1.0) and capped[95:].max() < weights[95:].max()


def test_boundary_views_move_a_share_of_the_batch_toward_random_teacher_classes(teacher_path: Path) -> None:
    teacher = load_teacher(teacher_path)
    teacher.model.eval()
    normalize = teacher.spec.normalize()
    side = teacher.spec.image_size
    images = normalize(torch.randint(0, 256, (64, teacher.spec.in_channels, side, side), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)))
    views = BoundaryViews.of(0.5, teacher, teacher.spec, teacher.num_classes)
    moved = views(images, torch.Generator().manual_seed(1))
    assert torch.equal(moved, views(images, torch.Generator().manual_seed(1)))  # seeded by the step's generator
    assert torch.equal(moved[32:], images[32:]) and not torch.equal(moved[:32], images[:32])
    std, mean = torch.tensor(teacher.spec.std).view(1, -1, 1, 1), torch.tensor(teacher.spec.mean).view(1, -1, 1, 1)
    pixels = moved * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # still images
    assert ((moved - images) * std).abs().max() <= 3 * 8 / 255 + 1e-5
    target = torch.randint(0, teacher.num_classes, (32,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = teacher.model(images[:32]), teacher.model(moved[:32])

    def margin(logits: torch.Tensor) -> torch.Tensor:  # target logit minus the best other one
        return logits.gather(1, target[:, None])[:, 0] - logits.scatter(1, target[:, None], -1e9).max(1).values

    assert (margin(after) > margin(before)).float().mean() > 0.9
    assert BoundaryViews.of(0.0, teacher, teacher.spec, teacher.num_classes) is None


def test_online_teacher_hands_over_its_features_on_the_views_it_labels(teacher_path: Path, selected: Path,
                                                                          tmp_path: Path) -> None:
    teacher = load_teacher(teacher_path)
    teacher.model.eval()
    side = teacher.spec.image_size
    views = torch.rand(300, teacher.spec.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    logits, features = OnlineTeacher(teacher, with_features=True)(views)  # 300 views: three CPU slices
    with torch.no_grad():
        expected = teacher.model.features(views)
        assert torch.allclose(logits, teacher.model.classifier(expected), atol=1e-5)
    assert torch.allclose(features, expected, atol=1e-5)
    assert not features.is_inference()  # autograd may use it in the loss
    assert OnlineTeacher(teacher, with_features=False)(views)[1] is None
    # feature matching on the online teacher's features needs no stored embedding: shards exported without it
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in selected.iterdir():
        if path.suffix == ".parquet":
            pq.write_table(pq.read_table(path).drop_columns(["embedding"]), plain / path.name)
        elif path.is_file():
            shutil.copy(path, plain / path.name)
    assert CuratedShards.open(plain).embedding_dim is None
    cfg = DistillConfig(shards=plain, out=tmp_path / "run", teacher=teacher_path, cutmix=1.0, feature_weight=1.0,
                        steps=4, batch_size=32, log_every=2, width=0.25, workers=0, device="cpu")
    assert [r["step"] for r in distill(cfg)["history"]] == [2, 4]
    stored = DistillConfig(**{**cfg.__dict__, "teacher": None, "cutmix": 0.0, "out": tmp_path / "stored"})
    with pytest.raises(UserError, match=r"--embedding\) or the teacher online"):
        distill(stored)


def test_held_out_rows_are_fixed_and_never_planned(selected: Path) -> None:
    shards = CuratedShards.open(selected)
    held = held_out_rows(shards.rows, 0.2)
    assert held is not None and 0.1 < held.mean() < 0.3
    assert np.array_equal(held, held_out_rows(shards.rows, 0.2)) and held_out_rows(shards.rows, 0.0) is None
    for seed in (0, 1):
        plan = EpochPlan(shards, 32, seed, epoch=0, held_out=held)
        planned = np.concatenate([shards.row_offsets[s] + r for s, r in plan.batches])
        assert not held[planned].any()
        assert len(planned) > 0.7 * shards.rows - 32


@pytest.mark.slow
def test_adaptive_balanced_cutmix_run_trains_on_batches_and_reports_held_out_agreement(
        selected: Path, teacher_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = DistillConfig(shards=selected, out=out, teacher=teacher_path, cutmix=1.0, mixup=0.4, affine=0.5,
                        balance_views=True, boundary_views=0.25, candidates=2.0, holdout=0.2, steps=8, batch_size=32,
                        log_every=4, eval_every=4, record_rows=True, width=0.25, workers=0, device="cpu")
    history = distill(cfg)["history"]
    assert [r["step"] for r in history] == [4, 8]
    for record in history:
        assert 0 <= record["eval_holdout_agreement"] <= 1 and 0 <= record["eval_holdout_class_agreement"] <= 1
        assert record["eval_holdout_kl"] >= 0 and record["eval_holdout_class_kl"] >= 0
    rows = read_recorded_rows(out)
    assert len(rows) == 8 * 32  # candidates are read two per row trained on, only the chosen are trained on
    held = held_out_rows(CuratedShards.open(selected).rows, 0.2)
    assert not held[rows[:, 2]].any()
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["candidates"] == 2.0 and recorded["affine"] == 0.5
    # `train eval --shards` recomputes the last held-out figures from the student file (how the experiment scores a
    # student trained on a refined copy of the folder on the unrefined rows)
    figures = tmp_path / "held-out.json"
    result = subprocess.run([sys.executable, "-m", "train", "eval", "--model", str(out / "student.pt"), "--shards",
                             str(selected), "--holdout", "0.2", "--json", str(figures), "--device", "cpu"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    recomputed = json.loads(figures.read_text())
    for name, value in recomputed.items():
        assert value == pytest.approx(history[-1][f"eval_{name}"], rel=1e-4, abs=1e-6), name
