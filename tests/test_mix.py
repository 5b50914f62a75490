"""TOML pool specs: sources in order, ranges and seeded subsets, unique and stable uids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curate.errors import UserError
from curate.pools import open_pool
from tests import formats

SPEC = """
name = "small-mix"
seed = 3

[[source]]
kind = "mnist"
name = "hidden"
root = "idx"          # relative: under --root
start = 10
stop = 30
count = 8

[[source]]
kind = "noise"
count = 5
size = 28
channels = 1

[[source]]
kind = "digits"
count = 12

[[source]]
kind = "glyphs"
name = "latin"
fonts = ["DejaVuSans.ttf"]
ranges = ["digits"]
size = 28
"""


@pytest.fixture
def mix_spec(tmp_path: Path, rng) -> Path:
    formats.write_mnist_like(tmp_path / "idx", "train", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                             np.arange(40, dtype=np.uint8) % 10, compress=True)
    path = tmp_path / "mix.toml"
    path.write_text(SPEC)
    return path


def test_mix_uids_unique_stable_and_sourced(mix_spec: Path, tmp_path: Path) -> None:
    pool = open_pool(str(mix_spec), tmp_path)
    assert len(pool) == 8 + 5 + 12 + 10
    uids = [pool.uid(i) for i in range(len(pool))]
    assert len(set(uids)) == len(uids)
    again = open_pool(str(mix_spec), tmp_path)
    assert uids == [again.uid(i) for i in range(len(again))]
    samples = list(pool)
    assert [s.uid for s in samples] == uids
    assert [s.source for s in samples[:8]] == ["hidden"] * 8
    assert {s.source for s in samples[8:13]} == {"noise"}
    assert samples[-1].source == "latin" and samples[-1].uid == "latin:DejaVuSans/U+0039"
    # The subset comes from rows 10..29 of the source, kept in source order, labels intact.
    rows = [int(s.key.split("/")[1]) for s in samples[:8]]
    assert rows == sorted(rows) and all(10 <= r < 30 for r in rows)
    assert all(s.label == int(s.key.split("/")[1]) % 10 for s in samples[:8])
    assert samples[8].label is None


def test_mix_seed_changes_the_subset(mix_spec: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(mix_spec.read_text().replace("seed = 3", "seed = 4"))
    a, b = open_pool(str(mix_spec), tmp_path), open_pool(str(other), tmp_path)
    assert [a.uid(i) for i in range(8)] != [b.uid(i) for i in range(8)]


def test_mix_scale_keeps_a_seeded_fraction_of_every_source(mix_spec: Path, tmp_path: Path) -> None:
    whole = open_pool(str(mix_spec), tmp_path)
    half = open_pool(str(mix_spec), tmp_path, {"scale": 0.5})
    assert [len(s) for s in half.sources] == [4, 3, 6, 5]  # rounded halves of 8, 5 (generated), 12, 10
    uids = {whole.uid(i) for i in range(len(whole))}
    assert {half.uid(i) for i in range(len(half))} <= uids  # a subset of what the full spec holds
    assert [half.uid(i) for i in range(len(half))] == [open_pool(str(mix_spec), tmp_path, {"scale": 0.5}).uid(i)
                                                       for i in range(len(half))]
    assert half.describe()["scale"] == 0.5 and whole.describe()["scale"] == 1.0
    with pytest.raises(UserError, match="not in"):
        open_pool(str(mix_spec), tmp_path, {"scale": 2})


def test_mix_shared_class_names(tmp_path: Path) -> None:
    spec = tmp_path / "digits.toml"
    spec.write_text('[[source]]\nkind = "digits"\nstop = 100\n\n'
                    '[[source]]\nkind = "mnist5k"\nname = "m5k"\ncount = 50\n')
    pool = open_pool(str(spec))
    assert pool.class_names == [str(d) for d in range(10)]
    assert len(pool) == 150


@pytest.mark.parametrize(("text", "message"), [
    ('[[source]]\nkind = "noise"\n[[source]]\nkind = "noise"\n', "repeat"),
    ('[[source]]\nkind = "hubble"\n', "unknown"),
    ('[[source]]\nkind = "digits"\ncount = 5000\n', "exceeds"),
    ('[[source]]\nkind = "noise"\ncolour = 3\n', "no option colour"),
    ('name = "x"\n', "no \\[\\[source\\]\\]"),
    ('[[source]\nkind=', "not valid TOML"),
])
def test_bad_specs_are_user_errors(tmp_path: Path, text: str, message: str) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(UserError, match=message):
        open_pool(str(spec))


def test_shipped_specs_parse() -> None:
    """The specs in data/pools/ name only known kinds and options (their data may be absent here)."""
    import tomllib

    from curate.pools import POOL_KINDS

    specs = sorted(Path(__file__).parent.parent.joinpath("data", "pools").glob("*.toml"))
    assert specs
    for path in specs:
        spec = tomllib.loads(path.read_text())
        for source in spec["source"]:
            cls = POOL_KINDS[source["kind"]]
            extra = set(source) - {"kind", "name", "root", "start", "stop", "count"} - set(cls.options)
            assert not extra, (path.name, source["kind"], extra)
