"""`train distill` under torchrun on 2 CPU processes (gloo) over shards exported by the real pipeline: the same
samples as one process, every row at most once per epoch, a killed rank resumed without losing a step, and resuming
with another number of processes where the reader positions allow it (else a one-line error)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.selected import CuratedShards
from train.cli import main as train_main
from train.row_audit import read_recorded_rows
from train.shards import EpochPlan

pytestmark = pytest.mark.slow

BATCH = 16  # global: 8 rows per rank


def distill_args(selected: Path, out: Path, steps: int, ckpt_every: int, *extra: str) -> list[str]:
    return ["-m", "train", "distill", "--shards", str(selected), "--out", str(out), "--student", "resnet8",
            "--width", "0.25", "--steps", str(steps), "--batch-size", str(BATCH), "--ckpt-every", str(ckpt_every),
            "--log-every", "5", "--workers", "0", "--device", "cpu", "--record-rows", *extra]


def one_process(*args: str) -> list[str]:
    return [sys.executable, *args]


def two_processes(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def epoch_lengths(selected: Path, world: int) -> list[int]:
    shards = CuratedShards.open(selected)
    return [len(EpochPlan(shards, BATCH // world, 0, 0, rank=r, world=world, lanes=2)) for r in range(world)]


def same_weights(a: Path, b: Path) -> bool:
    x = torch.load(a / "student.pt", weights_only=True)["state_dict"]
    y = torch.load(b / "student.pt", weights_only=True)["state_dict"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def steps(selected: Path) -> int:
    """Enough steps for every rank of 2 to finish its first epoch (ranks' lanes drop different partial batches, so
    their epochs may differ in length)."""
    return max(epoch_lengths(selected, 2))


@pytest.fixture(scope="module")
def two_rank_run(selected: Path, steps: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    run(two_processes(*distill_args(selected, out, steps, 10)))
    return out


def test_two_processes_train_the_same_samples_once_per_epoch(selected: Path, steps: int, two_rank_run: Path,
                                                             tmp_path: Path) -> None:
    rows = CuratedShards.open(selected).rows
    two = read_recorded_rows(two_rank_run)
    one_out = tmp_path / "one"
    run(one_process(*distill_args(selected, one_out, steps, 10)))
    one = read_recorded_rows(one_out)

    assert len(two) == len(one) == steps * BATCH  # the global batch: same steps, same samples
    assert sorted(np.unique(two[:, 0])) == list(range(steps))
    first_epoch = two[two[:, 1] == 0, 2]
    # each row at most once; each lane (2 per rank) drops its partial last batch (< 8 rows)
    assert len(np.unique(first_epoch)) == len(first_epoch) >= rows - 2 * 2 * (BATCH // 2 - 1)
    seen_once = one[one[:, 1] == 0, 2]
    assert len(np.unique(seen_once)) == len(seen_once) >= rows - BATCH  # one process drops a partial batch
    for name in ("student.pt", "metrics.jsonl", "curves.png", f"ckpt-{steps:08d}.pt"):
        assert (two_rank_run / name).exists(), name
    assert torch.load(two_rank_run / f"ckpt-{steps:08d}.pt", weights_only=False)["step"] == steps


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun started (children of ``parent``), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_killed_rank_resumes_without_losing_a_step(selected: Path, steps: int, two_rank_run: Path,
                                                   tmp_path: Path, capsys) -> None:
    out = tmp_path / "killed"
    launcher = subprocess.Popen(two_processes(*distill_args(selected, out, steps, 10)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "ckpt-00000020.pt").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(worker_pids(launcher.pid)[-1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    launcher.wait(timeout=120)
    assert launcher.returncode != 0 and not (out / "student.pt").exists(), "finished before the kill"

    # its checkpoints stand mid-epoch: one process cannot take over two readers' positions
    with pytest.raises(SystemExit) as refused:  # in this process: the refusal comes before any step
        train_main(distill_args(selected, out, steps, 10, "--resume")[2:])
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert "written by 2 processes in the middle of an epoch" in err and "Traceback" not in err

    run(two_processes(*distill_args(selected, out, steps, 10, "--resume")))
    assert same_weights(out, two_rank_run)
    assert np.array_equal(read_recorded_rows(out), read_recorded_rows(two_rank_run))


def test_resume_on_more_processes_at_an_epoch_boundary(selected: Path, tmp_path: Path) -> None:
    epoch = epoch_lengths(selected, 1)[0]
    out = tmp_path / "grow"
    run(one_process(*distill_args(selected, out, epoch + 10, epoch)))
    for name in (f"ckpt-{epoch + 10:08d}.pt", "student.pt"):  # back to the checkpoint at the epoch boundary
        (out / name).unlink()
    run(two_processes(*distill_args(selected, out, epoch + 10, epoch, "--resume")))
    rows = read_recorded_rows(out)
    after = rows[rows[:, 0] >= epoch]
    assert len(after) == 10 * BATCH and set(after[:, 1]) == {1}  # the second epoch, read by two ranks
    assert len(list(out.glob("rows-rank*.i64"))) == 2 and (out / "student.pt").exists()
