"""Untrusted input (issue 15): data files that try to run code, queries that try to read the machine, and bad
input that must end in one line and exit code 2, never a traceback or a silently useless result."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.cli import main as curate_main
from curate.errors import UserError
from curate.pools import open_pool
from curate.query.config import SelectConfig
from curate.query.scored import ScoredPool
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.selected import CuratedShards
from tests import formats
from train.config import DistillConfig, TeacherConfig
from train.distill import distill
from train.row_audit import read_recorded_rows


class Payload:
    """Unpickled with plain ``pickle``, this runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def crafted(kind: str, root: Path, marker: Path, rng) -> str:
    """A pool of ``kind`` in its official layout whose first batch file carries the payload; the pool argument."""
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 4)
    if kind == "cifar10":
        formats.write_cifar10(root, [(images, labels)], (images, labels))
        formats.write_pickle(root / "cifar-10-batches-py" / "test_batch", {b"data": Payload(marker), b"labels": [0]})
        return "cifar10:test"
    if kind == "cifar100":
        formats.write_cifar100(root, images, labels, [f"c{i}" for i in range(100)])
        formats.write_pickle(root / "cifar-100-python" / "meta", {"fine_label_names": Payload(marker)})
        return "cifar100"
    formats.write_imagenet32(root, [(images, labels)])
    formats.write_pickle(root / "train_data_batch_1", {"data": [Payload(marker)], "labels": [1]})
    return kind


# -- 1. pickled dataset batches run no code ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "imagenet32", "imagenet64"])
def test_pickled_batches_that_run_code_are_refused(tmp_path: Path, rng, kind: str) -> None:
    marker = tmp_path / "payload-ran"
    pool_arg = crafted(kind, tmp_path / "data", marker, rng)
    with pytest.raises(UserError, match="asks to run posix.system"):
        assert open_pool(pool_arg, tmp_path / "data").class_names  # CIFAR-100 reads its meta file for these
    assert not marker.exists()


def test_score_refuses_a_crafted_batch_with_one_line(tmp_path: Path, rng, teacher_path: Path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    pool_arg = crafted("cifar10", tmp_path / "data", marker, rng)
    code, err = run(curate_main, ["score", "--teacher", str(teacher_path), "--pool", pool_arg, "--root",
                                  str(tmp_path / "data"), "--out", str(tmp_path / "scored")], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "refused" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_batches_read_under_every_pickle_protocol(tmp_path: Path, rng, protocol: int) -> None:
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": formats.planar(images), b"labels": [1, 2, 3], b"batch_label": b"testing batch 1 of 1",
             b"filenames": [b"a.png", b"b.png", b"c.png"]}
    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    pool = open_pool("cifar10", tmp_path)
    assert [pool.sample(i).label for i in range(3)] == [1, 2, 3]
    assert np.array_equal(pool.sample(2).image.numpy().transpose(1, 2, 0), images[2])


# -- 2. SQL reads the scored pool and nothing else -------------------------------------------------------------

MACHINE_READS = [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT content FROM read_text('/proc/self/environ')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('/etc/passwd', sep = ':')",
    "SELECT * FROM read_csv('https://example.com/data.csv')",
    "SELECT * FROM read_parquet('SCORED/../outside.parquet')",
    "SELECT * FROM scores, (SELECT * FROM read_text('/etc/passwd'))",
]


@pytest.mark.parametrize("query", MACHINE_READS)
def test_sql_cannot_read_the_machine_or_the_network(scored: Path, tmp_path: Path, monkeypatch, capsys,
                                                    query: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # where DuckDB would install an extension for https://
    secret = scored.parent / "outside.parquet"
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), secret)
    code, err = run(curate_main, ["sql", "--scored", str(scored), query.replace("SCORED", str(scored))], capsys)
    out = capsys.readouterr().out
    assert code == 2 and err.startswith("error: query failed") and err.count("\n") == 1, err
    assert "root:" not in out + err and "s3cr3t" not in out + err and "PATH=" not in out + err
    assert not (tmp_path / ".duckdb").exists()


@pytest.mark.parametrize("where", ["length((SELECT string_agg(content, '') FROM read_text('/etc/passwd'))) > 0",
                                   "source IN (SELECT file FROM glob('/*'))"])
def test_select_filters_cannot_read_the_machine(scored: Path, tmp_path: Path, capsys, where: str) -> None:
    code, err = run(curate_main, ["select", "--scored", str(scored), "--strategy", "topk", "--budget", "5",
                                  "--where", where, "--out", str(tmp_path / "sel.parquet")], capsys)
    assert code == 2 and "Permission Error" in err and err.count("\n") == 1, err
    assert not (tmp_path / "sel.parquet").exists()


def test_sql_settings_are_locked(scored: Path) -> None:
    con = ScoredPool.open(scored).connect()
    for statement in ("SET enable_external_access = true", "SET allowed_directories = ['/']",
                      "SET autoinstall_known_extensions = true", "RESET lock_configuration"):
        with pytest.raises(duckdb.Error, match="configuration"):
            con.execute(statement)
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == ScoredPool.open(scored).rows


def test_sql_out_still_writes_and_takes_a_trailing_comment(scored: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "per-source.parquet"
    code, err = run(curate_main, ["sql", "--scored", str(scored), "--out", str(out),
                                  "SELECT source, count(*) AS n FROM scores GROUP BY source -- per source"], capsys)
    assert code == 0, err
    assert pq.read_table(out).num_rows == len(ScoredPool.open(scored).connect().execute(
        "SELECT DISTINCT source FROM scores").fetchall())


# -- 3. export on a full disk, and what a killed export leaves ------------------------------------------------


def tmpfs(mount: Path, options: str):
    """A tmpfs mounted at ``mount`` (needs root, as CI runs; the test is skipped elsewhere), unmounted after."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    yield from tmpfs(tmp_path / "small-disk", "size=512k")


@pytest.fixture
def read_only(tmp_path: Path):
    yield from tmpfs(tmp_path / "read-only", "ro,size=1m")


def uniform_selection(scored: Path, out: Path, budget: int, capsys) -> Path:
    code, err = run(curate_main, ["select", "--scored", str(scored), "--strategy", "uniform", "--budget", str(budget),
                                  "--out", str(out)], capsys)
    assert code == 0, err
    return out


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(scored: Path, small_disk: Path, tmp_path: Path,
                                                                capsys) -> None:
    selection = uniform_selection(scored, tmp_path / "sel.parquet", 1500, capsys)  # 1.1 MiB of 28x28 pixels
    result = subprocess.run([sys.executable, "-m", "curate", "export", "--scored", str(scored), "--selection",
                             str(selection), "--out", str(small_disk / "selected")], capture_output=True, text=True)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])  # was -7: SIGBUS
    assert result.stderr.startswith("error: cannot write") and result.stderr.count("\n") == 1, result.stderr
    assert list(small_disk.iterdir()) == []


def test_a_killed_exports_leftovers_are_removed_by_the_next(scored: Path, tmp_path: Path, capsys) -> None:
    selection = uniform_selection(scored, tmp_path / "sel.parquet", 50, capsys)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".selected.tmp-{int(dead.stdout)}"  # as a SIGKILL leaves it: that pid is gone
    leftover.mkdir()
    (leftover / "pixels.tmp.npy").write_bytes(b"\0" * 1000)
    code, err = run(curate_main, ["export", "--scored", str(scored), "--selection", str(selection), "--out",
                                  str(tmp_path / "selected")], capsys)
    assert code == 0, err
    assert not leftover.exists() and (tmp_path / "selected" / "_manifest.json").exists()


# -- 4. one run per folder -------------------------------------------------------------------------------------


@pytest.fixture
def held_folder(tmp_path: Path):
    """A run folder held by another process, as a running `curate score` or `train distill` holds it."""
    folder = tmp_path / "busy"
    code = (f"import sys, time; from curate.locks import FolderLock; lock = FolderLock({str(folder)!r}).__enter__(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield folder, holder
    holder.kill()
    holder.wait()


def test_a_second_score_into_a_folder_in_use_is_refused(held_folder, teacher_path: Path) -> None:
    folder, holder = held_folder
    with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid}\\)"):
        score_pool(ScoreConfig(teacher=teacher_path, pool="digits", out=folder, workers=0, limit=64))
    assert not (folder / "_manifest.json").exists()


def test_a_second_distill_into_a_folder_in_use_is_refused_until_the_holder_dies(held_folder,
                                                                                selected: Path) -> None:
    folder, holder = held_folder
    cfg = DistillConfig(shards=selected, out=folder, steps=2, batch_size=16, workers=0, device="cpu")
    with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid}\\)"):
        distill(cfg)
    assert not (folder / "metrics.jsonl").exists() and not (folder / "config.json").exists()
    holder.kill()  # SIGKILL: the kernel drops its lock, nothing stale is left
    holder.wait()
    assert distill(cfg)["steps"] == 2


# -- 5. unwritable outputs fail before the work, full disks in one line -----------------------------------------


def test_read_only_outputs_fail_before_any_work(read_only: Path, scored: Path, selected: Path, mnist_root: Path,
                                                capsys) -> None:
    from train.cli import main as train_main

    commands = [
        (curate_main, ["select", "--scored", str(scored), "--strategy", "topk", "--budget", "5",
                       "--out", str(read_only / "sel.parquet")]),
        (curate_main, ["sql", "--scored", str(scored), "--out", str(read_only / "x.parquet"), "SELECT 1 AS one"]),
        (curate_main, ["export", "--scored", str(scored), "--selection", str(scored.parent / "none.parquet"),
                       "--out", str(read_only / "selected")]),
        (train_main, ["distill", "--shards", str(selected), "--out", str(read_only / "run"), "--steps", "2",
                      "--batch-size", "16", "--device", "cpu"]),
        (train_main, ["teacher", "--dataset", "mnist", "--root", str(mnist_root), "--epochs", "50",
                      "--out", str(read_only / "teacher.pt"), "--device", "cpu"]),  # 50 epochs: fails first
    ]
    for main, argv in commands:
        code, err = run(main, argv, capsys)
        assert code == 2 and err.startswith("error: cannot write") and err.count("\n") == 1, (argv, err)
        assert "Read-only file system" in err and "choose a writable --out" in err, err
    assert list(read_only.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_one_line(small_disk: Path, selected: Path) -> None:
    cfg = DistillConfig(shards=selected, out=small_disk / "run", steps=4, batch_size=16, ckpt_every=1, keep=4,
                        workers=0, device="cpu")
    with pytest.raises(UserError, match="cannot write .*ckpt-.*No space left on device.*free disk space"):
        distill(cfg)
    assert not [p for p in (small_disk / "run").iterdir() if ".tmp-" in p.name]


# -- 6. bad pool files and options ------------------------------------------------------------------------------


def test_a_decompression_bomb_is_one_recorded_error_not_the_end_of_the_run(tmp_path: Path, teacher_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (20000, 20000)).save(folder / "bomb.png", optimize=True)  # 400 Mpixel in a few hundred KB
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 20, 200)).save(folder / f"ok{i}.png")
    out = tmp_path / "scored"
    summary = score_pool(ScoreConfig(teacher=teacher_path, pool="folder", root=folder, out=out, workers=0,
                                     reference_count=64))
    assert (summary.rows, summary.errors) == (3, 1)
    errors = pq.read_table(out / "_errors.parquet").to_pylist()
    assert errors[0]["uid"].endswith(":bomb.png") and "DecompressionBombError" in errors[0]["error"]


def test_a_truncated_npy_is_refused_at_open(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((100, 28, 28), np.uint8))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated: 49 of the 100 records"):
        open_pool("npy", tmp_path / "cut.npy")


@pytest.mark.parametrize(("kind", "options", "message"), [
    ("noise", {"count": -5}, "count=-5 of noise must be at least 1"),
    ("noise", {"count": "many"}, "count='many' of noise is not a whole number"),
    ("noise", {"size": 0}, "size=0 of noise must be at least 1"),
    ("glyphs", {"size": "big"}, "size='big' of glyphs is not a whole number"),
    ("folder", {"max_side": 0}, "max_side=0 of folder must be at least 1"),
    ("patches", {"count": 2.5}, "count=2.5 of patches is not a whole number"),
    ("glyphs", {"invert": "yes"}, "invert='yes' of glyphs is not true or false"),
])
def test_pool_options_are_checked_at_open(tmp_path: Path, kind: str, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        open_pool(kind, tmp_path, options)


@pytest.mark.parametrize(("spec", "message"), [
    ('[[source]]\nkind = "digits"\ncount = -5\n', "count = -5 is not a whole number >= 1"),
    ('[[source]]\nkind = "digits"\nstart = "10"\n', "start = '10' is not a whole number >= 0"),
    ('sed = 3\n[[source]]\nkind = "digits"\n', "unknown top-level key sed"),
    ('seed = "zero"\n[[source]]\nkind = "digits"\n', "seed = 'zero' is not a whole number"),
    ('[[source]]\nkind = "digits"\ncolour = "red"\n', "has no option colour"),
])
def test_mix_specs_are_checked_at_open(tmp_path: Path, spec: str, message: str) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(spec)
    with pytest.raises(UserError, match=message):
        open_pool(str(path))


# -- 7. options that would make a useless model --------------------------------------------------------------


@pytest.mark.parametrize(("build", "message"), [
    (lambda: DistillConfig(temperature=0), "--temperature 0"),
    (lambda: DistillConfig(temperature=-2), "--temperature -2"),
    (lambda: DistillConfig(lr=float("nan")), "--lr nan"),
    (lambda: DistillConfig(lr=-1), "--lr -1"),
    (lambda: DistillConfig(epochs=-1), "--epochs -1"),
    (lambda: DistillConfig(width=0), "--width 0"),
    (lambda: DistillConfig(mixup=float("nan"), teacher=Path("t.pt")), "--mixup nan"),
    (lambda: TeacherConfig(dataset="mnist", lr=float("nan")), "--lr nan"),
    (lambda: SelectConfig(strategy="diverse", budget=10, clusters=0), "--clusters 0"),
    (lambda: SelectConfig(strategy="knn", budget=10, per_seed=-1), "--per-seed -1"),
    (lambda: SelectConfig(strategy="sample", budget=10, tau=float("inf")), "--tau inf"),
])
def test_options_that_make_a_useless_model_are_refused(build, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build()


def test_a_diverging_run_stops_in_one_line_without_a_student(selected: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", steps=8, batch_size=16, lr=1e30, log_every=2,
                        workers=0, device="cpu")
    with pytest.raises(UserError, match="diverged and no student is saved"):
        distill(cfg)
    assert not (tmp_path / "run" / "student.pt").exists()


# -- 8. --resume takes the same paths however they are written ---------------------------------------------------


def test_resume_with_the_same_paths_written_otherwise(selected: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = DistillConfig(shards=selected, out=Path("run"), steps=4, batch_size=16, ckpt_every=2, workers=0,
                          device="cpu")
    distill(DistillConfig(**{**first.__dict__, "steps": 4}))  # a finished run to continue from its checkpoint
    (tmp_path / "run" / "student.pt").unlink()
    again = DistillConfig(**{**first.__dict__, "out": tmp_path / "sub" / ".." / "run",
                             "shards": Path(os.path.relpath(selected, tmp_path))})
    assert distill(again, resume=True)["steps"] == 4
    with pytest.raises(UserError, match="changed config \\(temperature\\)"):
        distill(DistillConfig(**{**again.__dict__, "temperature": 2.0}), resume=True)
    # a run folder moved elsewhere (another disk, a new layout) resumes from where it now is
    (tmp_path / "run" / "student.pt").unlink()
    (tmp_path / "run").rename(tmp_path / "moved")
    assert distill(DistillConfig(**{**first.__dict__, "out": Path("moved")}), resume=True)["steps"] == 4


# -- 9. smaller holes --------------------------------------------------------------------------------------------


def test_a_sql_selection_repeating_a_uid_is_refused_at_select(scored: Path, tmp_path: Path, capsys) -> None:
    code, err = run(curate_main, ["select", "--scored", str(scored), "--strategy", "sql", "--budget", "20",
                                  "--query", "SELECT s.uid FROM (SELECT uid FROM scores LIMIT 1) s, range(20)",
                                  "--out", str(tmp_path / "sel.parquet")], capsys)
    assert code == 2 and "20 times" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("table", "message"), [
    (pa.table({"uid": [1, 2, 3]}), "uid is int64, not text"),
    (pa.table({"uid": ["a:1"], "weight": ["heavy"]}), "weight is string, not a number"),
])
def test_selection_files_of_the_wrong_types_are_one_line(scored: Path, tmp_path: Path, capsys, table,
                                                         message: str) -> None:
    pq.write_table(table, tmp_path / "sel.parquet")
    code, err = run(curate_main, ["export", "--scored", str(scored), "--selection", str(tmp_path / "sel.parquet"),
                                  "--out", str(tmp_path / "selected")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_manifests_that_are_not_objects_are_one_line(scored: Path, selected: Path, tmp_path: Path, capsys) -> None:
    import shutil

    for folder, manifest, argv in [
        (scored, "_manifest.json", ["sql", "--scored", "{copy}", "SELECT 1"]),
        (selected, "_manifest.json", None),
    ]:
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        (copy / manifest).write_text("[1, 2, 3]")
        if argv is not None:
            code, err = run(curate_main, [a.replace("{copy}", str(copy)) for a in argv], capsys)
            assert code == 2 and "not an object" in err and err.count("\n") == 1, err
        else:
            with pytest.raises(UserError, match="not an object"):
                distill(DistillConfig(shards=copy, out=tmp_path / "run", steps=2, batch_size=16, device="cpu"))


def test_a_corrupt_vector_index_is_one_line(scored: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "scored"
    shutil.copytree(scored, copy)
    assert run(curate_main, ["index", "--scored", str(copy)], capsys)[0] == 0
    index_file = copy / "_index" / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:100])
    code, err = run(curate_main, ["select", "--scored", str(copy), "--strategy", "knn", "--budget", "10",
                                  "--out", str(tmp_path / "sel.parquet")], capsys)
    assert code == 2 and "is damaged" in err and err.count("\n") == 1, err


def test_a_shard_the_manifest_does_not_list_is_refused(selected: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "selected"
    shutil.copytree(selected, copy)
    shutil.copy(copy / "shard-00000.parquet", copy / "shard-00099.parquet")
    with pytest.raises(UserError, match="shard-00099.parquet that _manifest.json does not list"):
        distill(DistillConfig(shards=copy, out=tmp_path / "run", steps=2, batch_size=16, device="cpu"))


def test_an_eval_pool_without_labels_is_refused_before_training(selected: Path, tmp_path: Path) -> None:
    cfg = DistillConfig(shards=selected, out=tmp_path / "run", steps=2, batch_size=16, eval_dataset="noise",
                        device="cpu")
    with pytest.raises(UserError, match="--eval noise has no labels"):
        distill(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_damaged_scored_shard_is_scored_again_on_resume(teacher_path: Path, tmp_path: Path) -> None:
    cfg = ScoreConfig(teacher=teacher_path, pool="digits", out=tmp_path / "scored", shard_rows=600, workers=0,
                      reference_count=64)
    score_pool(cfg)
    whole = pq.read_table(tmp_path / "scored" / "part-00001.parquet")
    damaged = tmp_path / "scored" / "part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(UserError, match="rerun `curate score`"):
        ScoredPool.open(tmp_path / "scored")
    summary = score_pool(cfg)
    assert (summary.shards_written, summary.shards_skipped) == (1, 2)
    assert pq.read_table(damaged).equals(whole)


def test_export_onto_an_existing_file_is_one_line(scored: Path, tmp_path: Path, capsys) -> None:
    selection = uniform_selection(scored, tmp_path / "sel.parquet", 20, capsys)
    (tmp_path / "taken").write_text("a file, not a folder")
    code, err = run(curate_main, ["export", "--scored", str(scored), "--selection", str(selection),
                                  "--out", str(tmp_path / "taken")], capsys)
    assert code == 2 and "is not an empty folder" in err and err.count("\n") == 1, err
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


# -- 11. error messages name options the command has --------------------------------------------------------------


def test_errors_name_the_options_of_the_command_at_hand(scored: Path, selected: Path, teacher_path: Path,
                                                        tmp_path: Path, capsys) -> None:
    import shutil

    from train.cli import main as train_main

    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    (tmp_path / "empty").mkdir()
    scored = Path(shutil.copytree(scored, tmp_path / "scored"))
    assert run(curate_main, ["index", "--scored", str(scored)], capsys)[0] == 0
    cases = [
        (train_main, ["eval", "--model", str(tmp_path / "missing.pt"), "--dataset", "digits"], "pass --model",
         "--teacher"),
        (train_main, ["distill", "--shards", str(selected), "--out", str(tmp_path / "r"), "--teacher", str(pickled),
                      "--steps", "2", "--device", "cpu"], "save it as a checkpoint", "--trust-pickle"),
        (curate_main, ["select", "--scored", str(scored), "--strategy", "knn", "--budget", "5", "--seeds",
                       str(tmp_path / "empty"), "--out", str(tmp_path / "s.parquet")], "give --seeds", "--root"),
        (curate_main, ["select", "--scored", str(scored), "--strategy", "knn", "--budget", "5", "--seeds",
                       str(tmp_path), "--teacher", str(pickled), "--out", str(tmp_path / "s.parquet")],
         "save it as a checkpoint", "--trust-pickle"),
        (train_main, ["teacher", "--dataset", "digits", "--out", str(tmp_path / "t.pt")], "--test-dataset", None),
        (train_main, ["teacher", "--dataset", "digits", "--test-dataset", "digits", "--arch", "lenet5",
                      "--out", str(tmp_path / "t.pt")], "--image-size", None),
    ]
    Image.new("RGB", (28, 28)).save(tmp_path / "seed.png")
    for main, argv, named, not_named in cases:
        code, err = run(main, argv, capsys)
        assert code == 2 and named in err and err.count("\n") == 1, (argv, err)
        assert not_named is None or not_named not in err, (argv, err)


# -- 10. any selection of one global batch trains on any number of ranks -----------------------------------------


@pytest.fixture(scope="module")
def one_row_group(scored: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 rows exported with the default --shard-rows and --row-group-rows: one shard of one row group."""
    from curate.query.config import ExportConfig
    from curate.query.export import export_selection
    from curate.query.select import Selector

    folder = tmp_path_factory.mktemp("one-group")
    Selector(SelectConfig(strategy="uniform", budget=600, scored=scored, out=folder / "sel.parquet")).run()
    export_selection(ExportConfig(selection=folder / "sel.parquet", scored=scored, out=folder / "selected"))
    return folder / "selected"


def torchrun(shards: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train", "distill", "--shards", str(shards), "--out", str(out), "--student", "lenet5",
                           "--workers", "0", "--device", "cpu", *options], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_train_on_a_single_row_group(one_row_group: Path, tmp_path: Path) -> None:
    shards = CuratedShards.open(one_row_group)
    assert len(shards.files) == 1 and shards.files[0].group_rows == (600,)
    done = torchrun(one_row_group, tmp_path / "run", "--steps", "30", "--batch-size", "32", "--record-rows")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_recorded_rows(tmp_path / "run")
    first_epoch = rows[rows[:, 1] == 0, 2]
    assert len(np.unique(first_epoch)) == len(first_epoch) >= 600 - 2 * 16  # each rank drops < one batch
    assert (tmp_path / "run" / "student.pt").exists()


@pytest.mark.slow
def test_too_small_a_selection_stops_every_rank_with_one_line(one_row_group: Path, tmp_path: Path) -> None:
    done = torchrun(one_row_group, tmp_path / "run", "--steps", "3", "--batch-size", "1024")
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 2 and all("fewer than the 1,024 read per step" in line for line in ours), done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "train/distill.py" not in done.stderr
