"""The ablation of the `full` profile: every candidate recipe once per tuning seed, and the recipe chosen by the
mean of its seeds' held-out KL, not by one seed's draw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.design import CANDIDATES, HELD_OUT_FILE, PROFILES, TASKS, TUNING_SEEDS, Design
from pipelines.experiment_report import ablation_scores


def finish(folder: Path, holdout_kl: float, steps: int = 3000) -> None:
    """A finished run's training log as `train distill` writes it: evaluations with held-out figures, the final
    one last."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": step, "loss": 0.1, "eval_accuracy": 0.8, "eval_holdout_agreement": 0.9,
              "eval_holdout_kl": holdout_kl + 0.1 * (step < steps)} for step in (steps // 2, steps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_every_candidate_runs_once_per_tuning_seed_in_its_own_folder(tmp_path: Path) -> None:
    design = Design(TASKS["fashion"], PROFILES["full"], tmp_path, None)
    runs = design.ablation_runs()
    assert len(TUNING_SEEDS) >= 2 and not set(TUNING_SEEDS) & set(PROFILES["full"].seeds)
    assert sorted((run.label, run.seed) for run in runs) == sorted(
        (name, seed) for name in CANDIDATES for seed in TUNING_SEEDS)
    assert len({run.folder for run in runs}) == len(runs)
    assert {run.steps for run in runs} == {PROFILES["full"].ablation_steps}
    assert {run.steps for run in design.arm_runs(CANDIDATES["online teacher"])} == {PROFILES["full"].steps}
    assert Design(TASKS["fashion"], PROFILES["default"], tmp_path, None).ablation_runs() == []


def test_the_recipe_criterion_is_the_mean_over_the_tuning_seeds(tmp_path: Path) -> None:
    design = Design(TASKS["fashion"], PROFILES["full"], tmp_path, None)
    # "online teacher" has the single best run, "online teacher + mixup" the better mean
    kl = {("online teacher", TUNING_SEEDS[0]): 0.040, ("online teacher", TUNING_SEEDS[1]): 0.070,
          ("online teacher + mixup", TUNING_SEEDS[0]): 0.050, ("online teacher + mixup", TUNING_SEEDS[1]): 0.052}
    runs = [run for run in design.ablation_runs() if (run.label, run.seed) in kl]
    for run in runs:
        finish(run.folder, kl[run.label, run.seed])
    scores = ablation_scores(runs)
    assert scores == pytest.approx({"online teacher": 0.055, "online teacher + mixup": 0.051})
    assert min(scores, key=scores.__getitem__) == "online teacher + mixup"


def test_a_refined_candidate_is_scored_on_the_unrefined_rows(tmp_path: Path) -> None:
    design = Design(TASKS["fashion"], PROFILES["full"], tmp_path, None)
    runs = [run for run in design.ablation_runs() if run.label == "refined images"]
    for run in runs:
        finish(run.folder, 0.01)  # its own held-out rows are partly refined: not the figure that counts
        (run.folder / HELD_OUT_FILE).write_text(json.dumps({"holdout_kl": 0.06, "holdout_agreement": 0.9}))
    assert ablation_scores(runs) == {"refined images": 0.06}
