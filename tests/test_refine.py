"""`curate refine` on a real curated folder (MNIST digits among glyphs, photo patches and noise, exported by
`curate export`): refined images fall closer to the teacher's BatchNorm statistics, keep their class, carry
the teacher's outputs on their stored pixels, and everything else of the folder stays as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from curate.errors import UserError
from curate.refine.config import RefineConfig
from curate.refine.run import Refiner, chosen_rows, refine_shards
from curate.selected import CuratedShards
from curate.spec import InputSpec
from curate.teachers import load_teacher
from curate.vectors import float_lists


def read_rows(folder: Path) -> pa.Table:
    shards = CuratedShards.open(folder)
    return pa.concat_tables(pq.read_table(f.path) for f in shards.files)


def images_of(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(b"".join(table["pixels"].to_pylist()), np.uint8).reshape(len(table), *shape)


@pytest.fixture(scope="module")
def refined(selected: Path, teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refine") / "refined"
    result = subprocess.run([sys.executable, "-m", "curate", "refine", "--shards", str(selected), "--teacher",
                             str(teacher_path), "--out", str(out), "--share", "0.25", "--steps", "10",
                             "--device", "cpu"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "BatchNorm deviation" in result.stdout and "teacher class kept" in result.stdout
    return out


def test_refined_images_move_toward_the_teachers_statistics_and_keep_their_class(
        selected: Path, refined: Path, teacher_path: Path) -> None:
    before, after = read_rows(selected), read_rows(refined)
    shards = CuratedShards.open(refined)
    changed = np.array([s.endswith("+refined") for s in after["source"].cast(pa.string()).to_pylist()])
    assert 0.2 < changed.mean() < 0.35  # a quarter of every class, at least one row each
    teacher = load_teacher(teacher_path)
    refiner = Refiner(teacher, InputSpec.from_meta(shards.manifest["input_spec"]), torch.device("cpu"),
                      RefineConfig(shards=selected, teacher=teacher_path))
    old = refiner.score(images_of(before, shards.image_shape)[changed])
    new = refiner.score(images_of(after, shards.image_shape)[changed])
    assert new["deviation"].mean() < 0.8 * old["deviation"].mean()
    classes = float_lists(before["logits"]).argmax(1)[changed]
    assert (new["logits"].argmax(1).numpy() == classes).mean() > 0.9
    # the stored logits and embedding are the teacher's on the stored (uint8) pixels
    np.testing.assert_allclose(float_lists(after["logits"])[changed], new["logits"].numpy(), rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(float_lists(after["embedding"])[changed], new["embedding"].numpy(), rtol=1e-2,
                               atol=2e-2)
    # the chosen rows were the ones furthest from the statistics within their class
    deviation = refiner.score(images_of(before, shards.image_shape))["deviation"].numpy()
    per_shard = np.concatenate([[0], np.cumsum([f.rows for f in shards.files])])
    all_classes = float_lists(before["logits"]).argmax(1)
    expected = np.concatenate([start + chosen_rows(deviation[start:stop], all_classes[start:stop], 0.25)
                               for start, stop in zip(per_shard[:-1], per_shard[1:])])
    assert np.array_equal(np.flatnonzero(changed), expected)


def test_everything_but_the_refined_rows_stays_as_exported(selected: Path, refined: Path) -> None:
    before, after = read_rows(selected), read_rows(refined)
    for column in ("uid", "weight", "label"):
        assert after[column].equals(before[column]), column
    changed = np.array([s.endswith("+refined") for s in after["source"].cast(pa.string()).to_pylist()])
    kept = pa.array(np.flatnonzero(~changed))
    for column in ("pixels", "logits", "embedding"):
        assert after[column].take(kept).equals(before[column].take(kept)), column
    old, new = CuratedShards.open(selected), CuratedShards.open(refined)
    assert [f.rows for f in new.files] == [f.rows for f in old.files]
    assert [f.group_rows for f in new.files] == [f.group_rows for f in old.files]
    manifest = json.loads((refined / "_manifest.json").read_text())
    assert manifest["teacher"] == old.manifest["teacher"] and manifest["provenance"]["refined_rows"] == changed.sum()
    assert manifest["provenance"]["refine"] == {"share": 0.25, "steps": 10, "lr": 0.005, "class_weight": 1.0}


def test_refine_refuses_another_teacher_a_used_folder_and_bad_options(
        selected: Path, refined: Path, workdir: Path, tmp_path: Path) -> None:
    from curate.models import build_model
    from curate.teachers import save_model

    other = save_model(build_model("resnet8", 10, 1, 28), {"num_classes": 10, "in_channels": 1, "image_size": 28,
                                                          "mean": [0.5], "std": [0.25]},
                       tmp_path / "other.pt", "checkpoint", arch="resnet8")
    with pytest.raises(UserError, match="not the teacher that scored"):
        refine_shards(RefineConfig(shards=selected, teacher=other, out=tmp_path / "x"))
    with pytest.raises(UserError, match="not an empty folder"):
        refine_shards(RefineConfig(shards=selected, teacher=other, out=refined))
    with pytest.raises(UserError, match="--share"):
        RefineConfig(shards=selected, teacher=other, share=0)
    with pytest.raises(UserError, match="--steps"):
        RefineConfig(shards=selected, teacher=other, steps=0)
    result = subprocess.run([sys.executable, "-m", "curate", "refine", "--shards", str(tmp_path / "none"),
                             "--teacher", str(other), "--out", str(tmp_path / "y")],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "curate export" in result.stderr + result.stdout


def test_the_experiment_distils_refined_recipes_on_the_refined_copy_and_scores_them_on_the_unrefined_rows(
        selected: Path, teacher_path: Path, tmp_path: Path) -> None:
    from pipelines.design import CANDIDATES, PROFILES, TASKS, TUNING_SEEDS, Design
    from pipelines.experiment_report import held_out
    from pipelines.hetero_distill import Experiment
    from pipelines.steps import Lanes

    design = Design(TASKS["fashion"], PROFILES["full"], tmp_path / "experiment", None)
    refined_runs = [run for run in design.ablation_runs() if run.recipe.refine]
    assert len(refined_runs) == 2 * len(TUNING_SEEDS) and {run.data for run in refined_runs} == {"refined"}
    signal = [run for run in design.arm_runs(CANDIDATES["refined images"]) if run.label == "related+signal"]
    assert signal and {run.data for run in signal} == {"refined"}
    # the selection's shards and the teacher where the design keeps them
    design.shards(0, "related", "no-fashion").parent.mkdir(parents=True)
    design.shards(0, "related", "no-fashion").symlink_to(selected, target_is_directory=True)
    shutil.copy(teacher_path, design.teacher(0))
    experiment = Experiment(design, Lanes(1, 1))
    experiment.refine(refined_runs)
    refined = CuratedShards.open(design.shards(0, "refined", "no-fashion"))
    assert refined.rows == CuratedShards.open(selected).rows
    # the teacher itself stands in for a student distilled on the refined copy: on the unrefined rows it matches
    # the stored logits (float16) all but exactly
    run = refined_runs[0]
    run.folder.mkdir(parents=True)
    shutil.copy(teacher_path, run.folder / "student.pt")
    experiment.score_on_unrefined_rows([run])
    figures = held_out(run.folder)
    assert figures["holdout_agreement"] > 0.97 and figures["holdout_kl"] < 0.01
