"""The query stage on a pool scored by a real MNIST teacher (fixtures in conftest): SQL, the vector index,
every selection strategy's contract, export round trip, report, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from curate.cli import main as curate_main
from curate.errors import UserError
from curate.pools import PoolDataset, open_pool
from curate.query.export import ExportConfig, export_selection
from curate.query.index import VectorIndex, build_index, embeddings_of
from curate.query.report import write_report
from curate.query.scored import ScoredPool
from curate.query.select import SelectConfig, Selector, water_fill
from curate.query.sql import EXAMPLES, check_read_only, run_query
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.spec import InputSpec


def scores_table(scored: Path, columns: list[str] | None = None) -> pa.Table:
    return ds.dataset(str(scored), format="parquet", ignore_prefixes=["_", "."]).to_table(columns=columns)


def select(scored: Path, out: Path, **options) -> pa.Table:
    Selector(SelectConfig(scored=scored, out=out, **options)).run()
    return pq.read_table(out)


def cosines(scored: Path, uids: list[str]) -> np.ndarray:
    table = scores_table(scored, ["uid", "embedding"])
    table = table.filter(pc.is_in(table["uid"], value_set=pa.array(uids)))
    vectors = embeddings_of(table)
    return vectors @ vectors.T


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        curate_main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# -- SQL --------------------------------------------------------------------------------------------------------


def test_sql_views_and_examples(scored: Path) -> None:
    pool = ScoredPool.open(scored)
    con = pool.connect(memory_limit="1GB")
    table = scores_table(scored, ["source"])
    expected = {k: v for k, v in zip(*np.unique(table["source"].cast(pa.string()).to_numpy(zero_copy_only=False),
                                                return_counts=True))}
    got = dict(con.execute("SELECT source, count(*) FROM scores GROUP BY source").fetchall())
    assert got == expected
    assert con.execute("SELECT count(*) FROM errors").fetchall()[0][0] == 1  # the corrupt icon
    assert con.execute("SELECT count(*) FROM classes").fetchall()[0][0] == 10
    for name, (_, query) in EXAMPLES.items():
        result = run_query(con, query).to_arrow_table()
        assert result.num_rows > 0, name
    per_source = run_query(con, EXAMPLES["per-source"][1]).to_arrow_table()
    assert dict(zip(per_source["source"].to_pylist(), per_source["rows"].to_pylist())) == expected


@pytest.mark.parametrize("statement", [
    "DROP VIEW scores",
    "CREATE TABLE x AS SELECT * FROM scores",
    "COPY scores TO 'x.parquet'",
    "SELECT 1; DELETE FROM classes",
    "INSERT INTO classes VALUES (99, 'x')",
    "ATTACH 'other.db'",
])
def test_sql_refuses_anything_but_one_query(scored: Path, statement: str) -> None:
    con = ScoredPool.open(scored).connect()
    with pytest.raises(UserError, match="only queries|exactly one query"):
        check_read_only(con, statement)


def test_sql_cli_writes_files_and_reports_bad_sql(scored: Path, tmp_path: Path, capsys) -> None:
    for suffix in (".parquet", ".csv", ".json"):
        out = tmp_path / f"result{suffix}"
        code, stdout, err = run_cli(["sql", "--scored", str(scored), "--example", "per-class", "--out", str(out)],
                                    capsys)
        assert code == 0 and out.exists() and "rows to" in stdout, err
    json_lines = (tmp_path / "result.json").read_text().splitlines()
    assert pq.read_table(tmp_path / "result.parquet").num_rows == len(json_lines)
    for argv, message in [
        (["sql", "--scored", str(scored), "SELECT nope FROM scores"], "query failed"),
        (["sql", "--scored", str(scored), "DROP VIEW scores"], "only queries"),
        (["sql", "--scored", str(scored), "--example", "nothing"], "no example"),
        (["sql", "--scored", str(tmp_path), "SELECT 1"], "not a scored pool"),
        (["sql", "--scored", str(scored), "SELECT 1", "--out", str(tmp_path / "x.xlsx")], "cannot tell the format"),
    ]:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_shards_of_another_teacher_are_refused(scored: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mixed"
    copy.mkdir()
    for path in scored.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    first = copy / "part-00000.parquet"
    table = pq.read_table(first)
    meta = json.loads(table.schema.metadata[b"curate"])
    meta["teacher_fingerprint"] = "0" * 64
    pq.write_table(table.replace_schema_metadata({"curate": json.dumps(meta)}), first)
    with pytest.raises(UserError, match="another teacher"):
        ScoredPool.open(copy)


# -- vector index -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_finds_each_row_itself(scored: Path, kind: str, tmp_path: Path) -> None:
    pool = ScoredPool.open(scored)
    summary = build_index(pool, kind, train_rows=1000)
    assert summary.kind == kind and summary.rows == pool.rows
    index = VectorIndex.load(pool)
    table = scores_table(scored, ["uid", "embedding"])
    assert index.uids.to_pylist() == table["uid"].to_pylist()  # ids map to the uid order written
    rows = np.arange(0, table.num_rows, 7)
    _, ids = index.search(embeddings_of(table.take(pa.array(rows))), 5)
    recall = np.mean([row in found for row, found in zip(rows, ids)])
    assert recall > {"flat": 0.99, "hnsw": 0.9, "ivf": 0.5}[kind], recall  # IVF-PQ codes are lossy by design
    assert not list(scored.glob("._index*"))


def test_index_kind_auto_and_budget(scored: Path) -> None:
    pool = ScoredPool.open(scored)
    assert build_index(pool, "auto").kind == "flat"  # a few thousand rows
    with pytest.raises(UserError, match="--budget-mb"):
        build_index(pool, "flat", budget_mb=0)


# -- selection --------------------------------------------------------------------------------------------------


def test_water_fill_gives_small_groups_everything_and_splits_the_rest() -> None:
    assert water_fill({0: 5, 1: 100, 2: 100}, 65) == {0: 5, 1: 30, 2: 30}
    assert water_fill({0: 5, 1: 100, 2: 100}, 66) == {0: 5, 1: 31, 2: 30}
    assert sum(water_fill({0: 3, 1: 4, 2: 1000, 3: 0}, 500).values()) == 500


@pytest.mark.parametrize("strategy", ["uniform", "topk", "sample", "balanced", "diverse", "knn"])
def test_every_strategy_honours_the_budget_and_is_reproducible(scored: Path, tmp_path: Path, strategy: str) -> None:
    if strategy == "knn":
        build_index(ScoredPool.open(scored))
    a = select(scored, tmp_path / "a.parquet", strategy=strategy, budget=150, seed=3)
    b = select(scored, tmp_path / "b.parquet", strategy=strategy, budget=150, seed=3)
    assert a.num_rows <= 150 and a.num_rows >= (120 if strategy == "diverse" else 150)
    assert a["uid"].to_pylist() == b["uid"].to_pylist()
    assert len(set(a["uid"].to_pylist())) == a.num_rows
    assert pc.all(pc.greater(a["weight"], 0)).as_py()
    provenance = json.loads(a.schema.metadata[b"curate"])
    assert provenance["config"]["strategy"] == strategy and provenance["teacher_fingerprint"]
    if strategy in ("uniform", "sample"):
        other = select(scored, tmp_path / "c.parquet", strategy=strategy, budget=150, seed=4)
        assert other["uid"].to_pylist() != a["uid"].to_pylist()


def test_topk_takes_exactly_the_highest(scored: Path, tmp_path: Path) -> None:
    table = scores_table(scored, ["uid", "relatedness"])
    expected = set(table.sort_by([("relatedness", "descending")]).slice(0, 100)["uid"].to_pylist())
    assert set(select(scored, tmp_path / "t.parquet", strategy="topk", budget=100)["uid"].to_pylist()) == expected
    by_expression = select(scored, tmp_path / "e.parquet", strategy="topk", budget=50, by="-confidence")
    assert max(by_expression["confidence"].to_pylist()) <= np.sort(scores_table(scored, ["confidence"])
                                                                  ["confidence"].to_numpy())[50] + 1e-6


def test_sample_prefers_related_rows_and_importance_weights_undo_it(scored: Path, tmp_path: Path) -> None:
    pool_mean = pc.mean(scores_table(scored, ["relatedness"])["relatedness"]).as_py()
    uniform = select(scored, tmp_path / "u.parquet", strategy="uniform", budget=600)
    preferred = select(scored, tmp_path / "p.parquet", strategy="sample", budget=600, tau=2.0, epsilon=0.1,
                       weights="importance")
    assert pc.mean(preferred["relatedness"]).as_py() > pc.mean(uniform["relatedness"]).as_py() + 1.0
    weights = preferred["weight"].to_numpy().astype(np.float64)
    assert weights.sum() == pytest.approx(600, rel=1e-4)  # rescaled to mean 1
    related = preferred["relatedness"].to_numpy().astype(np.float64)
    weighted_mean = float((weights * related).sum() / weights.sum())
    # the weighted mean estimates the mean over all candidates; the plain mean of the preferred sample does not
    assert abs(weighted_mean - pool_mean) < 0.5 * abs(related.mean() - pool_mean)


def test_balanced_fills_equal_class_quotas_and_class_weights_equalise(scored: Path, tmp_path: Path) -> None:
    preds = scores_table(scored, ["pred"])["pred"].to_numpy()
    counts = dict(zip(*np.unique(preds, return_counts=True)))
    chosen = select(scored, tmp_path / "b.parquet", strategy="balanced", budget=400, weights="class")
    got = dict(zip(*np.unique(chosen["pred"].to_numpy(), return_counts=True)))
    assert got == {k: v for k, v in water_fill({int(k): int(v) for k, v in counts.items()}, 400).items() if v}
    totals = [chosen.filter(pc.equal(chosen["pred"], c))["weight"].to_numpy().sum() for c in got]
    assert np.allclose(totals, totals[0], rtol=1e-4)
    # within each class, the quota goes to the most related rows
    table = scores_table(scored, ["uid", "pred", "relatedness"])
    for c, n in got.items():
        in_class = table.filter(pc.equal(table["pred"], c)).sort_by([("relatedness", "descending")])
        assert set(chosen.filter(pc.equal(chosen["pred"], c))["uid"].to_pylist()) == \
            set(in_class.slice(0, n)["uid"].to_pylist())


def test_dedup_keeps_no_pair_above_the_threshold(scored: Path, tmp_path: Path) -> None:
    # the most related rows are digits of a few classes, tight in the teacher's embedding space
    plain = select(scored, tmp_path / "p.parquet", strategy="topk", budget=200)
    assert cosines(scored, plain["uid"].to_pylist())[np.triu_indices(200, 1)].max() > 0.98
    deduped = select(scored, tmp_path / "d.parquet", strategy="topk", budget=200, dedup=0.98)
    sims = cosines(scored, deduped["uid"].to_pylist())
    assert deduped.num_rows == 200 and sims[np.triu_indices(200, 1)].max() <= 0.98 + 1e-3
    # refilled from further down the same ranking, which it starts with
    assert set(deduped["uid"].to_pylist()) - set(plain["uid"].to_pylist())
    assert deduped["uid"][0] == plain["uid"][0]
    diverse = select(scored, tmp_path / "v.parquet", strategy="diverse", budget=150, clusters=10)
    assert cosines(scored, diverse["uid"].to_pylist())[np.triu_indices(diverse.num_rows, 1)].max() <= 0.98 + 1e-3


def test_knn_of_seed_images_finds_their_source(scored: Path, tmp_path: Path, mnist_root: Path,
                                               teacher_path: Path) -> None:
    from PIL import Image

    build_index(ScoredPool.open(scored))
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    digits = open_pool("mnist:test", mnist_root)
    for i in range(5):
        Image.fromarray(digits.sample(900 + i).image[0].numpy()).save(seeds / f"seed{i}.png")
    near = select(scored, tmp_path / "k.parquet", strategy="knn", budget=50, seeds=seeds, teacher=teacher_path)
    assert near.num_rows == 50
    assert np.mean(np.array(near["source"].cast(pa.string()).to_pylist()) == "mnist-unseen") > 0.9


def test_where_and_sql_strategy_compose(scored: Path, tmp_path: Path) -> None:
    filtered = select(scored, tmp_path / "w.parquet", strategy="balanced", budget=60, where="source <> 'mnist-unseen'")
    assert "mnist-unseen" not in filtered["source"].cast(pa.string()).to_pylist()
    query = "SELECT uid, 1 + confidence AS weight FROM candidates WHERE source = 'photo' ORDER BY uid LIMIT 20"
    chosen = select(scored, tmp_path / "s.parquet", strategy="sql", budget=20, query=query)
    assert chosen["uid"].to_pylist() == sorted(chosen["uid"].to_pylist())
    raw = 1 + chosen["confidence"].to_numpy().astype(np.float64)
    assert np.allclose(chosen["weight"].to_numpy(), raw * 20 / raw.sum(), rtol=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"strategy": "topk", "budget": 10**6}, "larger than"),
    ({"strategy": "topk", "budget": 10, "where": "nope > 1"}, "--where failed"),
    ({"strategy": "topk", "budget": 10, "by": "nope"}, "--by failed"),
    ({"strategy": "topk", "budget": 10, "weights": "importance"}, "inclusion probabilities"),
    ({"strategy": "sql", "budget": 10, "query": "SELECT 'x:1' AS uid"}, "not in the scored pool"),
    ({"strategy": "sql", "budget": 10, "query": "SELECT source FROM scores"}, "uid column"),
    ({"strategy": "sql", "budget": 10, "query": "DELETE FROM classes"}, "only queries"),
    ({"strategy": "magic", "budget": 10}, "unknown --strategy"),
])
def test_selection_errors(scored: Path, tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        select(scored, tmp_path / "x.parquet", **options)
    assert not (tmp_path / "x.parquet").exists()


# -- export and report ------------------------------------------------------------------------------------------


def test_export_round_trip(scored: Path, tmp_path: Path, teacher_path: Path, pool_spec: Path) -> None:
    selection = select(scored, tmp_path / "sel.parquet", strategy="balanced", budget=300, weights="class")
    out = tmp_path / "selected"
    summary = export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=out,
                                            shard_rows=128, row_group_rows=64, embedding=True, seed=1))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert summary.rows == manifest["rows"] == 300 and [s["rows"] for s in manifest["shards"]] == [128, 128, 44]
    assert manifest["image_shape"] == [1, 28, 28]
    assert manifest["teacher"]["fingerprint"] == ScoredPool.open(scored).fingerprint
    shards = pq.read_table(out)
    assert pq.ParquetFile(out / "shard-00000.parquet").metadata.num_row_groups == 2
    assert sorted(shards["uid"].to_pylist()) == sorted(selection["uid"].to_pylist())
    assert shards["uid"].to_pylist() != selection["uid"].to_pylist()  # shuffled across shards

    scores = scores_table(scored, ["uid", "logits", "embedding"])
    order = pc.index_in(shards["uid"], value_set=scores["uid"])
    assert shards["logits"].to_pylist() == scores["logits"].take(order).to_pylist()
    assert shards["embedding"].to_pylist() == scores["embedding"].take(order).to_pylist()
    weights = dict(zip(selection["uid"].to_pylist(), selection["weight"].to_pylist()))
    assert shards["weight"].to_pylist() == [weights[u] for u in shards["uid"].to_pylist()]

    pool = open_pool(str(pool_spec))
    spec = InputSpec.from_meta(manifest["input_spec"])
    dataset = PoolDataset(pool, spec.geometry())
    uid_to_index = {pool.uid(i): i for i in range(len(pool))}
    for row in shards.slice(0, 40).to_pylist():
        expected = dataset[uid_to_index[row["uid"]]].image
        pixels = torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8).reshape(manifest["image_shape"])
        assert torch.equal(pixels, expected), row["uid"]

    with pytest.raises(UserError, match="already exists"):
        export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=out))


def test_export_as_webdataset_tars_streams_the_same_rows_with_the_webdataset_library(scored: Path,
                                                                                     tmp_path: Path) -> None:
    webdataset = pytest.importorskip("webdataset")
    select(scored, tmp_path / "sel.parquet", strategy="balanced", budget=150, weights="class")
    folders = {}
    for fmt in ("parquet", "webdataset"):
        folders[fmt] = tmp_path / fmt
        export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=folders[fmt],
                                      shard_rows=64, row_group_rows=32, embedding=True, seed=3, format=fmt))
    manifest = json.loads((folders["webdataset"] / "_manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 22]
    expected = pq.read_table(folders["parquet"]).to_pylist()
    stream = webdataset.WebDataset(str(folders["webdataset"] / "shard-{00000..00002}.tar"), shardshuffle=False,
                                   empty_check=False).decode("l8")
    streamed = list(stream)
    assert len(streamed) == len(expected) == 150
    for row, sample in zip(expected, streamed):
        meta = sample["json"]
        assert (meta["uid"], meta["source"], meta["label"]) == (row["uid"], row["source"], row["label"])
        assert meta["weight"] == pytest.approx(row["weight"], rel=1e-7)
        pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(manifest["image_shape"])[0]
        assert np.array_equal(sample["png"], pixels)
        assert np.array_equal(sample["logits.npy"], np.array(row["logits"], dtype=np.float32))
        assert np.array_equal(sample["embedding.npy"], np.array(row["embedding"], dtype=np.float32))
        assert sample["cls"] == meta["teacher_class"] == int(np.argmax(row["logits"]))
    from train.config import DistillConfig
    from train.distill import distill

    with pytest.raises(UserError, match="holds WebDataset tars"):
        distill(DistillConfig(shards=folders["webdataset"], out=tmp_path / "run", steps=2, batch_size=16,
                              device="cpu"))


def test_export_refuses_a_changed_pool_and_foreign_uids(tmp_path: Path, teacher_path: Path, mnist_root: Path) -> None:
    digits = open_pool("mnist:test", mnist_root)
    images = np.stack([digits.sample(i).image[0].numpy() for i in range(300)])
    np.save(tmp_path / "a.npy", images)
    scored = tmp_path / "scored"
    score_pool(ScoreConfig(teacher=teacher_path, pool="npy", root=tmp_path / "a.npy", out=scored, workers=0,
                           reference_count=64))
    select(scored, tmp_path / "sel.parquet", strategy="uniform", budget=50)
    (tmp_path / "changed").mkdir()
    np.save(tmp_path / "changed" / "a.npy", np.roll(images, 1, axis=0))  # same name and size, other images
    with pytest.raises(UserError, match="other teacher outputs"):
        export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=tmp_path / "o",
                                      root=tmp_path / "changed" / "a.npy"))
    (tmp_path / "cut").mkdir()
    np.save(tmp_path / "cut" / "a.npy", images[:200])
    with pytest.raises(UserError, match="differs from the one scored"):
        export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=tmp_path / "o",
                                      root=tmp_path / "cut" / "a.npy"))
    (tmp_path / "moved").mkdir()
    np.save(tmp_path / "moved" / "a.npy", images)  # the same data elsewhere is fine
    export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=tmp_path / "ok",
                                  root=tmp_path / "moved" / "a.npy"))
    pq.write_table(pa.table({"uid": ["npy:99999"], "weight": [1.0]}), tmp_path / "foreign.parquet")
    with pytest.raises(UserError, match="not in"):
        export_selection(ExportConfig(scored=scored, selection=tmp_path / "foreign.parquet", out=tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_report_draws_every_plot_and_names_every_source(scored: Path, tmp_path: Path) -> None:
    select(scored, tmp_path / "sel.parquet", strategy="balanced", budget=100)
    summary = write_report(scored, tmp_path / "report", tmp_path / "sel.parquet")
    for name in summary.files:
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    text = (tmp_path / "report" / "report.md").read_text()
    for source in ("mnist-unseen", "latin", "photo", "noise", "icons"):
        assert source in text


def test_query_commands_chain_and_fail_in_one_line(scored: Path, tmp_path: Path, capsys) -> None:
    s, sel, out = str(scored), str(tmp_path / "sel.parquet"), str(tmp_path / "selected")
    for argv, expected in [
        (["index", "--scored", s], "flat index"),
        (["select", "--scored", s, "--strategy", "balanced", "--budget", "120", "--weights", "class", "--out", sel],
         "selected 120"),
        (["export", "--scored", s, "--selection", sel, "--out", out, "--shard-rows", "64", "--row-group-rows", "32"],
         "wrote 120 samples in 2 shards"),
        (["report", "--scored", s, "--selection", sel, "--out", str(tmp_path / "report")], "report.md"),
    ]:
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0 and expected in " ".join(stdout.split()), (argv, stdout, err)
    for argv, message in [
        (["select", "--scored", s, "--strategy", "topk", "--budget", "99999", "--out", sel], "larger than"),
        (["select", "--scored", s, "--strategy", "magic", "--budget", "5", "--out", sel], "unknown --strategy"),
        (["export", "--scored", s, "--selection", sel, "--out", out], "already exists"),
        (["export", "--scored", s, "--selection", sel, "--out", str(tmp_path / "x"), "--shard-rows", "100",
          "--row-group-rows", "64"], "not a multiple"),
        (["export", "--scored", s, "--selection", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "x")],
         "cannot read the selection"),
        (["index", "--scored", s, "--kind", "lsh"], "unknown index kind"),
    ]:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
