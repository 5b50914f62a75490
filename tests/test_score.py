"""`curate score` on a real (small) teacher: contract columns, relatedness that separates sources,
exact resume after SIGKILL, refusal of a mismatched output, and unreadable samples reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from curate.errors import UserError
from curate.pools import open_pool, read_batch
from curate.score.config import ScoreConfig
from curate.score.forward import READ_BYTES, READ_ROWS, BatchScorer, ForwardPass, rows_per_read, score_reference
from curate.score.indicators import INDICATORS
from curate.score.runner import score_pool
from curate.teachers import load_teacher, save_model
from tests.processes import kill_after_second_shard


def read_scored(folder: Path):
    return ds.dataset(str(folder), format="parquet", ignore_prefixes=["_", "."]).to_table()


def test_relatedness_ranks_the_teachers_data_above_other_sources(scored: Path) -> None:
    table = read_scored(scored).to_pandas()
    table["source"] = table["source"].astype(str)
    inside = table.source == "mnist-unseen"
    # Floors well under what this teacher measures: Latin letters are strokes on black like digits, the
    # hardest case; photo patches are where output-only scores fail (the teacher is confident on them).
    floors = {"latin": 0.65, "photo": 0.8, "noise": 0.8, "icons": 0.85}
    aurocs = {}
    for source in floors:
        rest = table.source == source
        labels = np.r_[np.ones(inside.sum()), np.zeros(rest.sum())]
        aurocs[source] = roc_auc_score(labels, np.r_[table.relatedness[inside], table.relatedness[rest]])
    aurocs["everything else"] = roc_auc_score(inside, table.relatedness)
    print("\n" + "\n".join(f"AUROC unseen MNIST vs {k}: {v:.3f}" for k, v in aurocs.items()))
    for source, floor in floors.items():
        assert aurocs[source] > floor, (source, aurocs)
    assert aurocs["everything else"] > 0.8, aurocs
    # The unseen digits keep their evaluation labels; the other sources have none.
    assert table.label[inside].notna().all() and table.label[~inside].isna().all()


def test_columns_metadata_manifest_and_errors(scored: Path, teacher_path: Path) -> None:
    files = sorted(scored.glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    schema = pq.read_schema(files[0])
    expected = ["uid", "source", "key", "label", "pred", "confidence", "margin", "entropy", "energy", "logits",
                "embedding", "feat_norm", *[f"ood_{n}" for n in INDICATORS], "relatedness"]
    assert schema.names == expected
    assert schema.field("logits").type.list_size == 10 and str(schema.field("logits").type.value_type) == "halffloat"
    assert schema.field("embedding").type.list_size == 64
    metadata = json.loads(schema.metadata[b"curate"])
    teacher = load_teacher(teacher_path)
    assert metadata["teacher_fingerprint"] == teacher.fingerprint
    assert metadata["class_names"] == teacher.class_names
    manifest = json.loads((scored / "_manifest.json").read_text())
    assert manifest["complete"] and all(s["complete"] for s in manifest["shards"])
    assert set(manifest["reference"]["mean"]) == set(INDICATORS) and manifest["reference"]["count"] == 256
    errors = pq.read_table(scored / "_errors.parquet").to_pylist()
    assert errors == [{"uid": "icons:broken.png", "error": errors[0]["error"]}] and "broken.png" in errors[0]["error"]
    table = read_scored(scored)
    assert table.num_rows == manifest["rows"] == sum(s["rows"] for s in manifest["shards"])
    uids = table["uid"].to_pylist()
    assert len(set(uids)) == len(uids) and "icons:broken.png" not in uids
    logits = np.array(table["logits"].to_pylist(), dtype=np.float32)
    assert (logits.argmax(1) == table["pred"].to_numpy()).mean() > 0.99  # float16 storage keeps the argmax


def test_rerun_on_complete_output_does_nothing(scored: Path, teacher_path: Path, pool_spec: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in scored.glob("part-*.parquet")}
    summary = score_pool(ScoreConfig(teacher=teacher_path, pool=str(pool_spec), out=scored, shard_rows=300,
                                     batch_size=64, workers=0, reference_count=256))
    assert summary.shards_written == 0 and summary.shards_skipped == len(before)
    assert before == {p.name: p.stat().st_mtime_ns for p in scored.glob("part-*.parquet")}


def test_other_teacher_or_pool_is_refused(scored: Path, teacher_path: Path, pool_spec: Path, workdir: Path) -> None:
    other = load_teacher(teacher_path)
    other_path = save_model(other.model, {**other.meta, "note": "changed"}, workdir / "other.pt", "checkpoint",
                              arch="resnet8", arch_options={"width": 1.0})
    with pytest.raises(UserError, match="another teacher"):
        score_pool(ScoreConfig(teacher=other_path, pool=str(pool_spec), out=scored, shard_rows=300, batch_size=64,
                               workers=0, reference_count=256))
    with pytest.raises(UserError, match="another pool"):
        score_pool(ScoreConfig(teacher=teacher_path, pool="digits", out=scored, shard_rows=300, batch_size=64,
                               workers=0, reference_count=256))


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_files(scored: Path, teacher_path: Path, pool_spec: Path,
                                                   workdir: Path) -> None:
    out = workdir / "killed"
    command = [sys.executable, "-m", "curate", "score", "--teacher", str(teacher_path), "--pool", str(pool_spec),
               "--out", str(out), "--shard-rows", "300", "--batch-size", "64", "--workers", "0",
               "--reference-count", "256"]
    kill_after_second_shard(command, out)
    # the shard being streamed is a temporary with a leading dot, which readers skip; renamed shards are whole
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp-*"))
    resumed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "already complete" in resumed.stdout
    assert not list(out.rglob("*.tmp-*")), "the killed run's temporaries are removed on resume"
    expected = sorted(p.name for p in scored.glob("part-*.parquet"))
    assert sorted(p.name for p in out.glob("part-*.parquet")) == expected
    for name in expected:
        assert pq.read_table(out / name).equals(pq.read_table(scored / name)), name
    assert pq.read_table(out / "_errors.parquet").equals(pq.read_table(scored / "_errors.parquet"))


def test_checkpoint_torchscript_and_export_give_the_same_columns(workdir: Path, teacher_path: Path) -> None:
    """The same teacher as a checkpoint, TorchScript and a torch.export program: every column, the embedding
    and the BatchNorm indicators included, equal within float tolerance."""
    loaded = load_teacher(teacher_path)
    tables = {}
    for fmt in ("checkpoint", "torchscript", "export"):
        path = teacher_path if fmt == "checkpoint" else save_model(loaded.model, loaded.meta,
                                                                   workdir / f"teacher-{fmt}.pt", fmt)
        out = workdir / f"scored-{fmt}"
        score_pool(ScoreConfig(teacher=path, pool="mnist5k", out=out, limit=300, shard_rows=300, batch_size=100,
                               workers=0, reference_count=128))
        tables[fmt] = read_scored(out)
    reference = tables["checkpoint"]
    assert np.isfinite(reference["ood_bn_mean"].to_numpy()).all() and "embedding" in reference.column_names
    for fmt in ("torchscript", "export"):
        table = tables[fmt]
        assert table.column_names == reference.column_names, fmt
        assert table["uid"].equals(reference["uid"]) and table["pred"].equals(reference["pred"]), fmt
        for column in ("logits", "embedding"):
            np.testing.assert_allclose(np.array(table[column].to_pylist(), dtype=np.float32),
                                       np.array(reference[column].to_pylist(), dtype=np.float32),
                                       rtol=1e-2, atol=2e-3, err_msg=f"{fmt} {column}")  # stored as float16
        for column in ["confidence", "entropy", "feat_norm", "relatedness", *(f"ood_{n}" for n in INDICATORS)]:
            np.testing.assert_allclose(table[column].to_numpy(), reference[column].to_numpy(), rtol=1e-4,
                                       atol=1e-4, err_msg=f"{fmt} {column}")


def test_a_read_batch_scored_in_several_teacher_calls_gives_the_rows_of_those_calls_one_by_one(
        scored: Path, teacher_path: Path) -> None:
    """Reading and writing many rows at once does not change a row: 200 digits scored as one batch in calls of
    64 are, row for row, the 64-digit batches scored on their own (and in the stored schema)."""
    teacher = load_teacher(teacher_path)
    forward = ForwardPass(teacher, torch.device("cpu"), autocast=False, channels_last=False)
    reference = score_reference(forward, teacher, 128, 0, 64)
    schema = pq.read_schema(sorted(scored.glob("part-*.parquet"))[0])
    scorer = BatchScorer(forward, reference, schema, batch_size=64)
    pool, geometry = open_pool("mnist5k"), teacher.spec.geometry()
    whole = scorer(read_batch(pool, range(200), geometry))
    calls = [scorer(read_batch(pool, range(start, min(start + 64, 200)), geometry)) for start in range(0, 200, 64)]
    assert whole.num_rows == 200 and whole.schema.equals(schema)
    assert pa.Table.from_batches([whole]).equals(pa.Table.from_batches(calls))


def test_read_batches_are_whole_teacher_calls_of_about_a_thousand_small_images() -> None:
    assert rows_per_read(256, 28 * 28) == READ_ROWS == 1024
    assert rows_per_read(100, 28 * 28) == 1000  # whole calls, never a part of one
    assert rows_per_read(4096, 28 * 28) == 4096  # a call larger than READ_ROWS is read as it is
    assert rows_per_read(256, 224 * 224 * 3) == 256  # 150 KB images: one call a read, under READ_BYTES
    assert rows_per_read(32, 224 * 224 * 3) * 224 * 224 * 3 <= READ_BYTES


def test_unwritable_out_is_a_user_error(teacher_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(UserError, match="--out"):
        score_pool(ScoreConfig(teacher=teacher_path, pool="digits", out=blocker / "scored", workers=0))
