"""JPEGs decoded where the teacher runs (``curate score --decode device``): the workers hand a batch's JPEGs over
as bytes and the scoring process decodes, crops and resizes them on its device. Run here on the CPU device, the
same code path as on CUDA except the decoder: rows, uids, labels and unreadable samples as with the workers'
decoding, pixels within a few levels."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.errors import UserError
from curate.pools import open_pool, read_batch
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.spec import InputSpec

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def claiming(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size than its data holds: a decompression bomb."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9:]


@pytest.fixture
def mixed_pool(tmp_path: Path, rng) -> tuple[Path, int, int]:
    """A mix of an array source, a folder of JPEGs of several sizes and modes among a PNG and two unreadable
    JPEGs, and a Parquet table of JPEG cells; returns the spec, the count of JPEGs the device decoder is handed
    (not the junk nor the bomb: their headers do not parse or claim too many pixels) and the unreadable count."""
    photo = Image.open(PHOTO).convert("RGB")
    folder = tmp_path / "photos"
    folder.mkdir()
    files = {
        "full.jpg": jpeg(photo, quality=90),
        "wide.jpg": jpeg(photo.crop((0, 100, 512, 300)), quality=80),
        "small.jpg": jpeg(photo.resize((40, 48)), quality=95),
        "grey.jpg": jpeg(photo.convert("L")),
        "cmyk.jpg": jpeg(photo.convert("CMYK")),
        "progressive.jpg": jpeg(photo.resize((128, 150)), progressive=True),
        "icon.png": (lambda b: (photo.resize((30, 30)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "cut.jpg": jpeg(photo)[:5000],
        "junk.jpg": b"\xff\xd8\xff" + b"not a jpeg" * 20,
        "bomb.jpg": claiming(jpeg(photo.resize((16, 16))), 60000, 60000),  # 3.6 gigapixels
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    cells = [jpeg(photo.rotate(angle).resize((64 + angle, 60))) for angle in range(0, 40, 5)]
    pq.write_table(pa.table({"jpg": pa.array(cells, pa.binary())}), tmp_path / "table.parquet", row_group_size=3)
    np.save(tmp_path / "grey.npy", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    spec = tmp_path / "mix.toml"
    spec.write_text(f"""
[[source]]
kind = "npy"
root = "{tmp_path / 'grey.npy'}"
[[source]]
kind = "folder"
root = "{folder}"
[[source]]
kind = "parquet"
files = ["{tmp_path / 'table.parquet'}"]
""")
    return spec, 6 + 1 + len(cells), 3


@pytest.mark.parametrize("spec", [InputSpec(1, 28, (0.5,), (0.5,)), InputSpec(3, 32, (0.5,) * 3, (0.5,) * 3),
                                  InputSpec(3, 56, (0.5,) * 3, (0.5,) * 3, resize_size=64)],
                         ids=["grey-28", "rgb-32", "rgb-56-of-64"])
def test_jpegs_decoded_on_the_device_give_the_workers_rows(mixed_pool, spec: InputSpec) -> None:
    path, jpegs, unreadable = mixed_pool
    pool = open_pool(str(path))
    positions = np.random.default_rng(1).permutation(len(pool))  # sources interleaved: rows go back in order
    geometry = spec.geometry()
    on_workers = read_batch(pool, positions, geometry)
    handed_over = read_batch(pool, positions, geometry, jpegs_encoded=True)
    assert len(handed_over.jpegs) == jpegs  # every JPEG whose header is sound, readable or not, left to the device
    assert not any(jpeg.name.endswith(("junk.jpg", "bomb.jpg")) for jpeg in handed_over.jpegs)
    on_device = handed_over.on_device(torch.device("cpu"), geometry)

    assert torch.equal(on_device.indices, on_workers.indices)
    assert on_device.uids == on_workers.uids and on_device.keys == on_workers.keys
    assert torch.equal(on_device.labels, on_workers.labels)
    assert sorted(on_device.errors) == sorted(on_workers.errors) and len(on_device.errors) == unreadable
    assert on_device.images.shape == on_workers.images.shape == (len(on_workers.indices), *geometry.shape)
    difference = (on_device.images.float() - on_workers.images.float()).abs().mean((1, 2, 3))
    array_rows = torch.tensor([s == "grey" for s in on_workers.sources])
    assert torch.all(difference[array_rows] == 0)  # not decoded at all
    # the device path resizes the full image at once; the workers decode at a reduced scale first
    assert difference.max() < 2, difference


def test_curate_score_decoding_on_the_device(mixed_pool, teacher_path: Path, tmp_path: Path) -> None:
    path, _, unreadable = mixed_pool
    tables = {}
    for decode in ("workers", "device"):
        score_pool(ScoreConfig(teacher=teacher_path, pool=str(path), out=tmp_path / decode, batch_size=8,
                               workers=1, reference_count=64, device="cpu", decode=decode))
        tables[decode] = ds.dataset(str(tmp_path / decode), format="parquet", ignore_prefixes=["_", "."]).to_table()
        errors = pq.read_table(tmp_path / decode / "_errors.parquet")
        assert errors.num_rows == unreadable
    workers, device = tables["workers"], tables["device"]
    assert workers["uid"].to_pylist() == device["uid"].to_pylist()
    logits = [np.stack(t["logits"].to_numpy(zero_copy_only=False)).astype(np.float32) for t in (workers, device)]
    assert np.abs(logits[0] - logits[1]).mean() < 0.5 * np.abs(logits[0]).mean()
    with pytest.raises(UserError, match="decode"):
        ScoreConfig(teacher=teacher_path, pool=str(path), decode="gpu")
