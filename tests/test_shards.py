"""The streaming reader over curated shards exported by the real `curate export` (fixture in conftest):
exact splitting over ranks and workers, seeded order, weighted sampling, and refusal of bad folders."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from curate.errors import UserError
from curate.selected import CuratedShards
from train.shards import EpochPlan, ReaderState, ShardBatches


def delivered(shards: CuratedShards, plan: EpochPlan, workers: int) -> list[dict[str, torch.Tensor]]:
    """One epoch of a plan through a DataLoader."""
    loader = DataLoader(ShardBatches(shards, lambda epoch: plan), batch_size=None, num_workers=workers,
                        sampler=[(0, k) for k in range(len(plan))])
    return list(loader)


def test_every_row_exactly_once_per_epoch_across_2_ranks_and_2_workers(selected: Path) -> None:
    shards = CuratedShards.open(selected)
    assert shards.rows == 600 and len(shards.files) == 5
    indices = []
    for rank in range(2):
        plan = EpochPlan(shards, 16, seed=7, epoch=3, rank=rank, world=2, lanes=2, drop_last=False)
        for batch in delivered(shards, plan, workers=2):
            indices.extend(batch["index"].tolist())
    assert sorted(indices) == list(range(600))


def test_batches_carry_the_exported_rows(selected: Path) -> None:
    shards = CuratedShards.open(selected)
    table = pq.read_table(selected / "shard-00000.parquet").append_column("index", pa.array(range(128)))
    plan = EpochPlan(shards, 32, seed=0, epoch=0, drop_last=False)
    checked = 0
    for batch in delivered(shards, plan, workers=0):
        for i, index in enumerate(batch["index"].tolist()):
            if index < 128:
                row = table.slice(index, 1).to_pylist()[0]
                assert batch["pixels"][i].numpy().tobytes() == row["pixels"]
                assert np.allclose(batch["logits"][i].numpy(), row["logits"])
                assert batch["weight"][i].item() == pytest.approx(row["weight"])
                assert batch["label"][i].item() == (-1 if row["label"] is None else row["label"])
                checked += 1
    assert checked == 128
    assert batch["pixels"].dtype == torch.uint8 and tuple(batch["pixels"].shape[1:]) == (1, 28, 28)


def test_order_is_seeded_and_changes_with_the_epoch(selected: Path) -> None:
    shards = CuratedShards.open(selected)

    def order(seed: int, epoch: int) -> list[int]:
        plan = EpochPlan(shards, 16, seed=seed, epoch=epoch, lanes=2)
        return [i for b in delivered(shards, plan, workers=0) for i in b["index"].tolist()]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    first = order(1, 0)
    assert len(first) == 592 and len(set(first)) == 592  # drop_last: 37 full batches of 16


def test_resuming_at_a_batch_gives_the_rest_of_the_epoch(selected: Path) -> None:
    shards = CuratedShards.open(selected)
    def plan_for(epoch: int) -> EpochPlan:
        return EpochPlan(shards, 16, seed=3, epoch=epoch, lanes=2)

    dataset = ShardBatches(shards, plan_for)
    whole = [dataset[key]["index"] for key in itertools.islice(dataset.keys(ReaderState(2, 0)), 3 * 37)]
    assert len(whole) == 111 and dataset.plan(4) is dataset.plan(4)  # 37 batches of 16 per epoch: 3 epochs
    resumed = ShardBatches(shards, plan_for)  # a fresh process's view, workers kept across the epoch boundaries
    loader = DataLoader(resumed, batch_size=None, num_workers=2,
                        sampler=itertools.islice(resumed.keys(ReaderState(2, 11)), 100))
    got = list(loader)
    assert [list(b["key"]) for b in got[:2]] == [[2, 11], [2, 12]] and list(got[26]["key"]) == [3, 0]
    assert all(torch.equal(a, b["index"]) for a, b in zip(whole[11:], got, strict=True))


def test_weighted_sampling_follows_the_weight_column(tmp_path: Path, selected: Path) -> None:
    folder = tmp_path / "weighted"
    shutil.copytree(selected, folder)
    rng = np.random.default_rng(0)
    for path in sorted(folder.glob("shard-*.parquet")):  # weights 1 or 4, row groups kept
        table = pq.read_table(path)
        weights = rng.choice([1.0, 4.0], table.num_rows).astype(np.float32)
        table = table.set_column(table.schema.get_field_index("weight"), pa.field("weight", pa.float32(), False),
                                 pa.array(weights))
        pq.write_table(table, path, row_group_size=32)
    shards = CuratedShards.open(folder)
    counts = np.zeros(shards.rows)
    for epoch in range(30):
        plan = EpochPlan(shards, 20, seed=0, epoch=epoch, weighted=True, window_groups=4)
        for shard_ids, rows in plan.batches:
            np.add.at(counts, shards.row_offsets[shard_ids] + rows, 1)
    heavy, light = counts[shards.weights == 4].mean(), counts[shards.weights == 1].mean()
    assert 3.3 < heavy / light < 4.8, heavy / light


def test_bad_folders_are_refused(tmp_path: Path, selected: Path) -> None:
    with pytest.raises(UserError, match="no shard folder"):
        CuratedShards.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        CuratedShards.open(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(selected, corrupt)
    (corrupt / "shard-00002.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="missing or corrupt"):
        CuratedShards.open(corrupt)
    mixed = tmp_path / "mixed"
    shutil.copytree(selected, mixed)
    path = mixed / "shard-00001.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"curate"])
    pq.write_table(table.replace_schema_metadata({"curate": json.dumps({**meta, "teacher_fingerprint": "x"})}), path)
    with pytest.raises(UserError, match="another teacher"):
        CuratedShards.open(mixed)
