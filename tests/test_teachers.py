"""Teachers round-trip through all four file formats with identical logits; bad teachers fail clearly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from curate.errors import UserError
from curate.models import MODELS, build_model
from curate.teachers import FORMATS, load_teacher, save_model

META = {"num_classes": 10, "class_names": [f"c{i}" for i in range(10)], "in_channels": 1, "image_size": 28,
        "mean": [0.29], "std": [0.35], "arch": "resnet8"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("resnet8", 10, 1, 28)
    # Non-trivial BatchNorm statistics, so eval-mode behaviour is really exercised.
    with torch.no_grad():
        for _ in range(3):
            net.train()(torch.randn(16, 1, 28, 28) * 2 + 1)
    return net.eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_gives_identical_logits(tmp_path: Path, model: torch.nn.Module, fmt: str) -> None:
    x = torch.randn(7, 1, 28, 28)
    with torch.inference_mode():
        expected = model(x)
    path = save_model(model, META, tmp_path / f"teacher-{fmt}.bin", fmt, arch="resnet8")
    overrides = META if fmt == "pickle" else None  # a pickled module carries no meta of its own
    teacher = load_teacher(path, trust_pickle=fmt == "pickle", meta_overrides=overrides)
    assert teacher.format == fmt
    with torch.inference_mode():
        got = teacher(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert teacher.class_names == META["class_names"]
    assert teacher.spec.shape() == (1, 28, 28) and teacher.spec.mean == (0.29,)
    assert teacher.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pickled_module_needs_trust(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_model(model, META, tmp_path / "pickled.pt", "pickle")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_teacher(path, meta_overrides=META)


def test_input_spec_mismatch_is_caught_at_load(tmp_path: Path, model: torch.nn.Module) -> None:
    path = save_model(model, META, tmp_path / "t.pt", "checkpoint", arch="resnet8")
    with pytest.raises(UserError, match="rejects 3x28x28"):
        load_teacher(path, meta_overrides={"in_channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3})
    export = save_model(model, META, tmp_path / "t.pt2", "export")
    with pytest.raises(UserError, match="rejects"):
        load_teacher(export, meta_overrides={"in_channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(UserError, match="class_names"):
        load_teacher(path, meta_overrides={"class_names": ["a", "b"]})


def test_corrupt_and_missing_files(tmp_path: Path, model: torch.nn.Module) -> None:
    good = save_model(model, META, tmp_path / "t.pt", "checkpoint", arch="resnet8")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable teacher"):
        load_teacher(truncated)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a model")
    with pytest.raises(UserError, match="not a model file"):
        load_teacher(junk)
    with pytest.raises(UserError, match="not found"):
        load_teacher(tmp_path / "absent.pt")


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_registry_models_expose_features_and_classifier(arch: str, channels: int, size: int) -> None:
    net = build_model(arch, 7, channels, size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.inference_mode():
        features = net.features(x)
        logits = net(x)
        recomposed = net.classifier(features)
    assert features.shape == (2, net.classifier.in_features)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(recomposed, logits)


def test_half_width_student_is_smaller() -> None:
    full, half = build_model("resnet8", 10, 1, 28), build_model("resnet8", 10, 1, 28, width=0.5)
    assert half.feature_dim == full.feature_dim // 2
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters()) / 3


def test_unknown_arch_is_a_user_error() -> None:
    with pytest.raises(UserError, match="resnet8"):
        build_model("vit-huge", 10)
