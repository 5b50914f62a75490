"""The pipeline's step runner with several steps at once: each step its own process, markers on success, a
failing step reported with the end of its log, finished steps skipped on a rerun, the stage's wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.errors import UserError
from pipelines.steps import Lanes, Step, StepRunner


def noise_scoring(out: Path, teacher: Path, name: str) -> Step:
    return Step(name, "score", ["curate", "score", "--teacher", str(teacher), "--pool", "noise", "-o", "count=64",
                                "--reference-count", "64", "--out", str(out / name), "--device", "cpu"])


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
