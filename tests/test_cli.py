"""The command lines: `train teacher` end to end on real data, `train eval`, `curate pools`, and clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.cli import main as curate_main
from curate.models import build_model
from curate.teachers import load_teacher, save_model
from tests import formats
from train.cli import main as train_main


def run(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def digits_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's real handwritten digits written as an MNIST-style IDX dataset (train 1500, test 297)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    root = tmp_path_factory.mktemp("digits") / "mnist"
    formats.write_mnist_like(root, "train", images[:1500], labels[:1500], compress=True)
    formats.write_mnist_like(root, "test", images[1500:], labels[1500:], compress=False)
    return root


@pytest.mark.slow
def test_train_teacher_end_to_end_then_eval(digits_idx: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "teacher.pt"
    code, stdout, _ = run(train_main, ["teacher", "--dataset", "mnist", "--root", str(digits_idx), "--arch", "resnet8",
                                       "--epochs", "4", "--batch-size", "64", "--no-flip", "--crop-padding", "1",
                                       "--out", str(out)], capsys)
    assert code == 0, stdout
    teacher = load_teacher(out)
    meta = teacher.meta
    assert meta["arch"] == "resnet8" and meta["num_classes"] == 10 and meta["image_size"] == 8
    assert 0.8 <= meta["test_accuracy"] <= 1.0, meta["history"]
    assert len(meta["history"]) == 4
    assert f"test accuracy {meta['test_accuracy']:.4f}" in stdout
    # `train eval` reproduces the stored test accuracy exactly.
    code, stdout, _ = run(train_main, ["eval", "--model", str(out), "--dataset", "mnist:test",
                                       "--root", str(digits_idx)], capsys)
    assert code == 0
    assert f"accuracy {meta['test_accuracy']:.4f}" in stdout


def test_curate_pools_lists_every_kind(capsys) -> None:
    code, stdout, _ = run(curate_main, ["pools"], capsys)
    assert code == 0
    for kind in ("cifar10", "imagenet32", "glyphs", "patches", "mix", "mnist5k", "digits", "folder", "npy"):
        assert kind in stdout


def test_console_scripts_run_as_modules() -> None:
    result = subprocess.run([sys.executable, "-m", "curate", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "pools" in result.stdout
    result = subprocess.run([sys.executable, "-m", "train", "teacher", "--dataset", "nope"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown pool kind 'nope'") and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("teachers")
    model = build_model("lenet5", 10, 1, 28)
    meta = {"num_classes": 10, "in_channels": 1, "image_size": 28, "mean": [0.5], "std": [0.5]}
    return {
        "checkpoint": save_model(model, meta, folder / "ok.pt", "checkpoint", arch="lenet5"),
        "pickle": save_model(model, meta, folder / "pickled.pt", "pickle"),
    }


def _bad_inputs(tmp: Path, teachers: dict[str, Path], digits: Path) -> list[tuple[list[str], str]]:
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(teachers["checkpoint"].read_bytes()[:500])
    wrong_meta = tmp / "meta.json"
    wrong_meta.write_text(json.dumps({"in_channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}))
    return [
        (["teacher", "--dataset", "mnist", "--root", str(tmp / "missing")], "not found"),
        (["teacher", "--dataset", "imagenet1k"], "unknown pool kind"),
        (["teacher", "--dataset", "mnist", "--root", str(digits), "--arch", "vgg99"], "unknown architecture"),
        (["teacher", "--dataset", "mnist", "--root", str(digits), "--epochs", "1", "--batch-size", "4096"],
         "fewer samples than one batch"),
        (["eval", "--model", str(tmp / "nothing.pt"), "--dataset", "mnist:test", "--root", str(digits)], "not found"),
        (["eval", "--model", str(corrupt), "--dataset", "mnist:test", "--root", str(digits)], "not a readable teacher"),
        (["eval", "--model", str(teachers["pickle"]), "--dataset", "mnist:test", "--root", str(digits)],
         "--trust-pickle"),
        (["eval", "--model", str(teachers["checkpoint"]), "--model-meta", str(wrong_meta), "--dataset", "mnist:test",
          "--root", str(digits)], "rejects 3x28x28"),
        (["eval", "--model", str(teachers["checkpoint"])], "give --dataset"),
        (["eval", "--model", str(teachers["checkpoint"]), "--dataset", "digits", "--shards", str(tmp)],
         "give --dataset"),
        (["eval", "--model", str(teachers["checkpoint"]), "--shards", str(tmp / "none")], "curate export"),
        (["eval", "--model", str(teachers["checkpoint"]), "--shards", str(tmp), "--holdout", "1.5"], "--holdout 1.5"),
        (["eval", "--model", str(teachers["checkpoint"]), "--dataset", "digits", "--json", str(corrupt / "x.json")],
         "cannot write"),
        (["eval", "--model", str(teachers["checkpoint"]), "--dataset", "digits"], None),
    ]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path: Path, teacher_files, digits_idx: Path, capsys) -> None:
    for argv, message in _bad_inputs(tmp_path, teacher_files, digits_idx):
        code, _, err = run(train_main, argv, capsys)
        if message is None:  # a valid command: the 8x8 digits are resized to the teacher's 28x28
            assert code == 0, err
            continue
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_eval_refuses_a_dataset_with_another_class_count(tmp_path: Path, capsys) -> None:
    model = build_model("lenet5", 3, 1, 28)
    path = save_model(model, {"num_classes": 3, "in_channels": 1, "image_size": 28, "mean": [0.5], "std": [0.5]},
                        tmp_path / "three.pt", "checkpoint", arch="lenet5")
    code, _, err = run(train_main, ["eval", "--model", str(path), "--dataset", "digits"], capsys)
    assert code == 2 and "predicts 3 classes" in err
    assert torch.load(path, weights_only=True)["arch"] == "lenet5"


def test_curate_score_bad_input(tmp_path: Path, teacher_files, capsys) -> None:
    cases = [
        (["score", "--teacher", str(tmp_path / "none.pt"), "--pool", "digits", "--out", str(tmp_path / "s")],
         "not found"),
        (["score", "--teacher", str(teacher_files["pickle"]), "--pool", "digits", "--out", str(tmp_path / "s")],
         "--trust-pickle"),
        (["score", "--teacher", str(teacher_files["checkpoint"]), "--pool", "hubble", "--out", str(tmp_path / "s")],
         "unknown pool kind"),
        (["score", "--teacher", str(teacher_files["checkpoint"]), "--pool", "noise", "-o", "colour=red", "--out",
          str(tmp_path / "s")], "no option colour"),
    ]
    for argv, message in cases:
        code, _, err = run(curate_main, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "s" / "part-00000.parquet").exists()
