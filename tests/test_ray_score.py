"""`curate score --executor ray` on a local Ray with 2 CPUs: the same files as the local executor, resume
across executors at shard granularity, and one-line errors when Ray is missing or the cluster unreachable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.score.config import ScoreConfig
from curate.score.runner import score_pool

if os.environ.get("CI") == "true":
    import ray  # CI installs the [ray] extra: a missing Ray must fail there, not skip
else:
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


def same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("part-*.parquet"))
    assert names and names == sorted(p.name for p in b.glob("part-*.parquet"))
    for name in names + ["_errors.parquet"]:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    shards_a = json.loads((a / "_manifest.json").read_text())["shards"]
    shards_b = json.loads((b / "_manifest.json").read_text())["shards"]
    assert shards_a == shards_b


def test_ray_actors_write_the_local_executors_rows(local_ray, scored: Path, teacher_path: Path, pool_spec: Path,
                                                   workdir: Path) -> None:
    out = workdir / "scored-ray"
    summary = score_pool(ScoreConfig(teacher=teacher_path, pool=str(pool_spec), out=out, shard_rows=300,
                                     batch_size=64, workers=0, reference_count=256, executor="ray", num_actors=2))
    assert summary.shards_written == len(list(scored.glob("part-*.parquet"))) and summary.errors == 1
    same_folder(out, scored)

    # A shard lost (a node died before it was written): only that shard is scored again, by either executor.
    resumed = workdir / "scored-resumed"
    shutil.copytree(scored, resumed)
    (resumed / "part-00002.parquet").unlink()
    summary = score_pool(ScoreConfig(teacher=teacher_path, pool=str(pool_spec), out=resumed, shard_rows=300,
                                     batch_size=64, workers=0, reference_count=256, executor="ray", num_actors=1))
    assert summary.shards_written == 1
    same_folder(resumed, scored)


def test_ray_actors_read_crawl_pools_like_the_local_executor(local_ray, teacher_path: Path, crawl_mix: Path,
                                                            tmp_path: Path) -> None:
    """WebDataset shards and Parquet tables travel to the actors as file names and indexes, not open files."""
    common = dict(teacher=teacher_path, pool=str(crawl_mix), shard_rows=500, batch_size=64, reference_count=256)
    score_pool(ScoreConfig(**common, out=tmp_path / "local", workers=0))
    summary = score_pool(ScoreConfig(**common, out=tmp_path / "ray", executor="ray", num_actors=2))
    assert summary.rows == 2100 and summary.errors == 1
    same_folder(tmp_path / "ray", tmp_path / "local")


def curate_without_ray(*args: str) -> subprocess.CompletedProcess:
    """`curate` in a fresh interpreter where `import ray` fails, as on an install without the extra."""
    code = "import sys; sys.modules['ray'] = None; from curate.cli import main; sys.argv[0] = 'curate'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)


def test_missing_ray_or_unreachable_cluster_is_one_line(teacher_path: Path, pool_spec: Path, workdir: Path) -> None:
    common = ["score", "--teacher", str(teacher_path), "--pool", str(pool_spec), "--out", str(workdir / "nowhere"),
              "--reference-count", "256", "--executor", "ray"]
    missing = curate_without_ray(*common)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "pip install 'hetero-distill[ray]'" in missing.stderr

    unreachable = subprocess.run([sys.executable, "-m", "curate", *common, "--address", "127.0.0.1:9"],
                                 capture_output=True, text=True, check=False, timeout=120)
    assert unreachable.returncode == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
