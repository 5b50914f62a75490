"""Run configs check their values where they are built (Python callers get the command line's checks), and
each command's defaults are the config's own."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer

from curate import cli as curate_cli
from curate.errors import UserError
from curate.options import config_from
from curate.query.config import ExportConfig, SelectConfig
from curate.score.config import ScoreConfig
from pipelines.design import CANDIDATES, CHOSEN
from train import cli as train_cli
from train.config import DistillConfig, TeacherConfig

COMMANDS = [(curate_cli.score, ScoreConfig), (curate_cli.select, SelectConfig), (curate_cli.export, ExportConfig),
            (train_cli.teacher, TeacherConfig), (train_cli.distill, DistillConfig)]


@pytest.mark.parametrize(("command", "config"), COMMANDS, ids=lambda c: getattr(c, "__name__", ""))
def test_command_defaults_are_the_configs(command, config):
    options = inspect.signature(command).parameters
    shared = [f for f in fields(config) if f.name in options]
    assert len(shared) >= len(fields(config)) - 3  # every option but pool_options, command, amp/window_groups...
    for field in shared:
        default = options[field.name].default
        expected = None if field.default is MISSING else field.default
        if field.default is MISSING and default is inspect.Parameter.empty:
            continue  # required on both sides
        assert default == expected, field.name


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ScoreConfig(teacher=Path("t.pt"), pool="digits", shard_rows=0), "--shard-rows 0"),
    (lambda: ScoreConfig(teacher=Path("t.pt"), pool="digits", batch_size=-1), "--batch-size -1"),
    (lambda: ScoreConfig(teacher=Path("t.pt"), pool="digits", reference_count=10), "--reference-count"),
    (lambda: DistillConfig(loss="l2"), "unknown --loss 'l2'"),
    (lambda: DistillConfig(student="vit"), "unknown student 'vit'"),
    (lambda: DistillConfig(weighting="both"), "unknown --weighting"),
    (lambda: DistillConfig(mixup=0.2), "needs --teacher"),
    (lambda: DistillConfig(affine=0.5), "--affine needs --teacher"),
    (lambda: DistillConfig(teacher=Path("t.pt"), affine=1.5), "--affine 1.5 is not a strength"),
    (lambda: DistillConfig(eval_every=0), "--eval-every 0"),
    (lambda: TeacherConfig(dataset="mnist", arch="vit"), "unknown architecture"),
    (lambda: TeacherConfig(dataset="mnist", epochs=0), "--epochs 0"),
    (lambda: SelectConfig(strategy="best", budget=10), "unknown --strategy 'best'"),
    (lambda: SelectConfig(strategy="topk", budget=0), "--budget 0"),
    (lambda: SelectConfig(strategy="topk", budget=10, weights="importance"), "inclusion probabilities"),
    (lambda: ExportConfig(selection=Path("s.parquet"), shard_rows=1000, row_group_rows=300), "multiple"),
])
def test_configs_refuse_bad_values_when_built(build, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build()


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_every_candidate_recipe_is_a_valid_train_distill_command(name: str) -> None:
    """The ablation's recipes parse as `train distill` options and build a config: a typo in the design fails
    here, not hours into the `full` profile."""
    distill = typer.main.get_command(train_cli.app).commands["distill"]
    argv = ["--shards", "selected", *CANDIDATES[name].options("teacher.pt")]
    params = distill.make_context("distill", argv).params
    cfg = config_from(DistillConfig, params)
    assert (cfg.teacher is not None) == CANDIDATES[name].online_teacher
    assert CHOSEN in CANDIDATES


def test_crops_default_on_only_where_the_teacher_labels_them(teacher_path: Path) -> None:
    """A stored logit belongs to the uncropped image: crops are on by default only with an online teacher."""
    assert DistillConfig().crop_padding == 0
    assert DistillConfig(teacher=teacher_path).crop_padding == 2
    assert DistillConfig(crop_padding=3).crop_padding == 3 and DistillConfig(teacher=teacher_path,
                                                                            crop_padding=0).crop_padding == 0
