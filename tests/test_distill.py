"""`train distill` on shards exported by the real pipeline (fixtures in conftest): a student that learns,
bit-exact resume after SIGKILL, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from curate.errors import UserError
from curate.teachers import load_teacher
from train.cli import main as train_main
from train.distill import DistillConfig, distill

pytestmark = pytest.mark.slow


def command(selected: Path, out: Path, *extra: str, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "train", "distill", "--shards", str(selected), "--out", str(out),
            "--student", "resnet8", "--width", "0.25", "--steps", "30", "--batch-size", "32", "--ckpt-every", "4",
            "--log-every", "5", "--workers", str(workers), "--device", "cpu", "--seed", "5", *extra]


def test_student_learns_from_the_shards(selected: Path, mnist_root: Path, teacher_path: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", student="resnet8", width=0.5, steps=240,
                        batch_size=64, eval_dataset="mnist:train", eval_root=mnist_root, eval_limit=1000,
                        eval_every=240, log_every=20, ckpt_every=120, workers=0, device="cpu", crop_padding=2,
                        teacher=None)
    result = distill(cfg)
    final = result["history"][-1]
    # 600 curated images, mostly unseen digits: far above the 10% of chance on digits the student never saw
    assert final["eval_accuracy"] > 0.6, final
    for name in ("metrics.jsonl", "curves.png", "config.json", "student.pt"):
        assert (tmp_path / "run" / name).exists(), name
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(20, 241, 20))
    assert {"loss", "lr", "samples_per_s", "teacher_fit"} <= set(lines[0])
    student = load_teacher(tmp_path / "run" / "student.pt")  # the teacher format: curate score can read it
    assert student.num_classes == 10 and student.meta["arch"] == "resnet8"


def test_sigkill_then_resume_is_bit_exact(selected: Path, teacher_path: Path, tmp_path: Path) -> None:
    # every state a step carries: weights, optimizer, schedule, reader, the weight average, the views' draws
    # (crops, CutMix until the clean finish) and the adaptive selection's
    extra = ("--candidates", "2", "--balance-views", "--holdout", "0.1", "--ema", "0.9", "--teacher",
             str(teacher_path), "--cutmix", "1", "--mix-prob", "0.5", "--clean-finish", "0.2")
    whole = tmp_path / "whole"
    with pytest.raises(SystemExit) as exit_:  # the uninterrupted run in this process: one interpreter start less
        train_main(command(selected, whole, *extra)[3:])
    assert exit_.value.code in (0, None)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(selected, killed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("ckpt-00000012.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "student.pt").exists(), "finished before the kill: make the run longer"
    # the worker count is speed only: resuming with another still continues bit for bit
    resumed = subprocess.run(command(selected, killed, *extra, "--resume", workers=0), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 30


def test_bad_input_is_refused_in_one_line(selected: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    base = ["distill", "--out", str(tmp_path / "r"), "--steps", "2", "--workers", "0", "--device", "cpu"]
    cases = [
        (["--shards", str(tmp_path / "empty")], "is empty"),
        (["--shards", str(selected), "--student", "vgg99"], "unknown student"),
        (["--shards", str(selected), "--loss", "hinge"], "unknown --loss"),
        (["--shards", str(selected), "--mixup", "0.4"], "needs --teacher"),
        (["--shards", str(selected), "--eval", "digits", "--batch-size", "4096"], "read per step"),
        (["--shards", str(selected), "--cutmix", "1"], "--cutmix needs --teacher"),
        (["--shards", str(selected), "--candidates", "0.5"], "--candidates"),
        (["--shards", str(selected), "--boundary-views", "0.5"], "--boundary-views needs --teacher"),
        (["--shards", str(selected), "--holdout", "1.5"], "--holdout 1.5 is not a fraction"),
        (["--shards", str(selected), "--ema", "1"], "--ema 1.0 is not a decay"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train_main(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_resume_with_a_changed_config_is_refused(selected: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", steps=4, batch_size=32, ckpt_every=2, workers=0,
                        device="cpu", width=0.25)
    distill(cfg)
    with pytest.raises(UserError, match="already holds a run"):
        distill(cfg)
    changed = DistillConfig(**{**cfg.__dict__, "temperature": 2.0})
    with pytest.raises(UserError, match="changed config.*temperature"):
        distill(changed, resume=True)
    # a checkpoint written before an option existed ran with that option's default: it resumes
    last = sorted((tmp_path / "run").glob("ckpt-*.pt"))[-1]
    state = torch.load(last, weights_only=False)
    del state["config"]["ema"]
    torch.save(state, last)
    distill(cfg, resume=True)
    with pytest.raises(UserError, match="changed config.*ema"):
        distill(DistillConfig(**{**cfg.__dict__, "ema": 0.9}), resume=True)


@pytest.mark.parametrize("decay", [0.0, 0.8])
def test_the_saved_student_is_the_moving_average_of_the_trained_weights(selected: Path, tmp_path: Path,
                                                                       decay: float) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", steps=6, batch_size=32, ckpt_every=6, workers=0,
                        device="cpu", width=0.25, ema=decay)
    distill(cfg)
    state = torch.load(tmp_path / "run" / "ckpt-00000006.pt", weights_only=False)
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["state_dict"]
    trained = state["model"]
    if decay == 0:
        assert "average" not in state
        assert all(torch.equal(saved[k], trained[k]) for k in trained)
        return
    average = {k.removeprefix("module."): v for k, v in state["average"].items() if k.startswith("module.")}
    assert int(state["average"]["n_averaged"]) == 6 and average.keys() == trained.keys() == saved.keys()
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    weights = [k for k, v in trained.items() if v.is_floating_point()]
    assert any(not torch.equal(average[k], trained[k]) for k in weights)  # an average, not the last weights


def test_online_teacher_with_mixup_and_feature_matching(selected: Path, teacher_path: Path, mnist_root: Path,
                                                        tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "online", teacher=teacher_path, mixup=0.3, loss="js",
                        hard_weight=0.5, feature_weight=0.5, steps=12, batch_size=32, log_every=6, eval_every=6,
                        eval_dataset="mnist:test", eval_root=mnist_root, eval_limit=200, workers=0, device="cpu")
    history = distill(cfg)["history"]
    assert [r["step"] for r in history] == [6, 12]
    assert all(0 <= r["eval_agreement"] <= 1 and r["loss"] > 0 for r in history)
    with pytest.raises(UserError, match="needs --teacher"):  # checked when the config is built
        DistillConfig(**{**cfg.__dict__, "teacher": None, "out": tmp_path / "x"})
