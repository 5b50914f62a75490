"""On a CUDA GPU (skipped without one): scoring and distillation through the device feed (side-stream copies,
one batch in flight, random draws copied without blocking) give what the CPU gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from train.distill import DistillConfig, distill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def read_scored(folder: Path):
    return ds.dataset(str(folder), format="parquet", ignore_prefixes=["_", "."]).to_table()


def test_scoring_on_the_gpu_gives_the_cpus_rows(scored: Path, teacher_path: Path, pool_spec: Path,
                                                tmp_path: Path) -> None:
    # as the `scored` fixture, on the GPU in float32 (no autocast): only kernel rounding may differ
    score_pool(ScoreConfig(teacher=teacher_path, pool=str(pool_spec), out=tmp_path / "gpu", shard_rows=300,
                           batch_size=64, workers=2, reference_count=256, device="cuda", autocast=False,
                           channels_last=False))
    cpu, gpu = read_scored(scored), read_scored(tmp_path / "gpu")
    assert cpu["uid"].to_pylist() == gpu["uid"].to_pylist()
    for column in ("logits", "embedding"):
        a = np.stack(cpu[column].to_numpy(zero_copy_only=False)).astype(np.float32)
        b = np.stack(gpu[column].to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
    assert (cpu["pred"].to_numpy() == gpu["pred"].to_numpy()).mean() > 0.995
    np.testing.assert_allclose(cpu["relatedness"].to_numpy(), gpu["relatedness"].to_numpy(), atol=1e-2)


def test_distillation_on_the_gpu_with_every_device_side_lever(selected: Path, teacher_path: Path,
                                                              tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", width=0.5, steps=120, batch_size=64,
                        teacher=teacher_path, mixup=0.4, cutmix=1.0, candidates=2, boundary_views=0.25,
                        balance_views=True, flip=True, log_every=20, ckpt_every=60, workers=2, device="cuda",
                        record_rows=True)
    history = distill(cfg)["history"]
    assert all(np.isfinite(record["loss"]) for record in history)
    assert history[-1]["teacher_fit"] > 0.5, history[-1]
    rows = np.fromfile(tmp_path / "run" / "rows-rank00000.i64", np.int64).reshape(-1, 3)
    assert len(rows) == 120 * 64
