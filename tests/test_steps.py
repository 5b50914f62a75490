"""The pipeline's step runner with several steps at once: each step its own process, markers on success, a
failing step reported with the end of its log, finished steps skipped on a rerun, changed steps run again, the
stage's wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.errors import UserError
from pipelines.steps import Lanes, Step, StepRunner


def noise_scoring(out: Path, teacher: Path, name: str, count: int = 64) -> Step:
    return Step(name, "score", ["curate", "score", "--teacher", str(teacher), "--pool", "noise", "-o", f"count={count}",
                                "--reference-count", "64", "--out", str(out / name), "--device", "cpu"],
                writes=out / name)


def test_steps_at_once_write_markers_report_failures_and_resume(tmp_path: Path, teacher_path: Path) -> None:
    runner = StepRunner(tmp_path / "pipeline")
    good = [noise_scoring(tmp_path, teacher_path, f"scored{i}") for i in range(3)]
    broken = noise_scoring(tmp_path, tmp_path / "missing.pt", "broken")
    with pytest.raises(UserError, match=r"broken.log") as failure:
        runner.run_at_once([*good, broken], Lanes(2, 1))
    assert "missing.pt" in str(failure.value)  # the step's own one-line error, from its log
    for step in good:  # the steps beside the failing one still ran to the end
        assert (tmp_path / "pipeline" / ".done" / step.name).read_text().strip() == step.command
        assert pq.read_table(tmp_path / step.name / "part-00000.parquet").num_rows == 64
    assert not (tmp_path / "pipeline" / ".done" / "broken").exists()
    assert (tmp_path / "pipeline" / "logs" / "scored0.log").read_text()
    first = json.loads((tmp_path / "pipeline" / ".done" / "timings.json").read_text())["score"]

    rerun = StepRunner(tmp_path / "pipeline")
    rerun.run_at_once(good, Lanes(2, 1))  # all done: nothing starts
    assert rerun.commands == [step.command for step in good]
    assert json.loads((tmp_path / "pipeline" / ".done" / "timings.json").read_text())["score"] == first

    # a step whose command line changed since it ran (another profile or recipe) runs again from scratch: the
    # scored folder of 64 rows would refuse a rerun over another pool, so it is removed first
    changed = noise_scoring(tmp_path, teacher_path, "scored0", count=32)
    again = StepRunner(tmp_path / "pipeline")
    again.run_at_once([changed, *good[1:]], Lanes(2, 1))
    assert (tmp_path / "pipeline" / ".done" / "scored0").read_text().strip() == changed.command
    assert pq.read_table(tmp_path / "scored0" / "part-00000.parquet").num_rows == 32
    assert json.loads((tmp_path / "pipeline" / ".done" / "timings.json").read_text())["score"] > first
