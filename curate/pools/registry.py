"""Pool kinds by name, and where data lives by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from curate.pools.base import Pool

POOL_KINDS: dict[str, type[Pool]] = {}

P = TypeVar("P", bound="type[Pool]")


def register(cls: P) -> P:
    """Class decorator: make a pool kind available by its ``kind`` name."""
    if cls.kind in POOL_KINDS:
        raise RuntimeError(f"pool kind {cls.kind!r} registered twice")
    POOL_KINDS[cls.kind] = cls
    return cls


def default_root() -> Path:
    """Where datasets are looked for when ``--root`` is not given: ``$CURATE_DATA`` or ``./data``."""
    return Path(os.environ.get("CURATE_DATA", "data"))


def make_pool(kind: str, root: Path | None = None, options: dict | None = None) -> Pool:
    """Open a pool of ``kind`` with its options; unknown kinds and options are user errors."""
    from curate.errors import UserError

    if kind not in POOL_KINDS:
        kinds = ", ".join(sorted(POOL_KINDS))
        raise UserError(f"unknown pool kind {kind!r}: run `curate pools` to list them ({kinds})")
    cls = POOL_KINDS[kind]
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        accepted = ", ".join(cls.options) or "none"
        raise UserError(f"pool kind {kind} has no option {', '.join(unknown)}: it accepts {accepted}")
    return cls(root=root, **options)
