"""Image pools: every source of unlabeled (or evaluation-labeled) images, by kind name.

``open_pool("cifar10")``, ``open_pool("fashion-mnist:test")`` or
``open_pool("data/pools/mix.toml")`` return a :class:`Pool`; wrap it in a
:class:`PoolDataset` to get tensors in a model's input spec.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from curate.errors import UserError

# Importing the modules registers their kinds.
from curate.pools import arrays, batches, generated, glyphs, idx, image_tables, images, mix, webdataset  # noqa: F401
from curate.pools.base import Pool, Sample, SampleError
from curate.pools.dataset import (
    BatchedPoolDataset,
    PoolBatch,
    PoolDataset,
    PoolItem,
    as_is,
    collate_samples,
    read_batch,
    reader_options,
    reader_workers,
)
from curate.pools.registry import POOL_KINDS, default_root, make_pool

__all__ = [
    "POOL_KINDS", "BatchedPoolDataset", "Pool", "PoolBatch", "PoolDataset", "PoolItem", "Sample", "SampleError",
    "as_is", "collate_samples", "default_root", "open_pool", "parse_options", "read_batch", "reader_options",
    "reader_workers",
]


def open_pool(pool: str, root: Path | str | None = None, options: dict | None = None) -> Pool:
    """Open ``kind``, ``kind:split`` or a ``.toml`` mix spec, reading from ``root`` (default "
      "``$CURATE_DATA``/``./data``)."""
    root_path = Path(root) if root is not None else None
    if pool.endswith(".toml"):
        return make_pool("mix", root_path, {**(options or {}), "spec": pool})
    kind, _, split = pool.partition(":")
    opts = dict(options or {})
    if split:
        opts["split"] = split
    return make_pool(kind, root_path, opts)


def parse_options(pairs: list[str]) -> dict:
    """``["split=test", "count=500", "fonts=['a.ttf','b.ttf']"]`` -> typed dict (values parsed as TOML, else "
                                                             "strings)."""
    options: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UserError(f"pool option {pair!r} is not name=value: write e.g. --option split=test")
        try:
            options[name.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[name.strip()] = value
    return options
