"""Pool kinds by name, and where data lives by default."""

from __future__ import annotations

import os
import types
import typing
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
    """Open a pool of ``kind`` with its options; unknown kinds, unknown options and option values of the wrong
    type or range are user errors, found before anything is read."""
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
    hints = typing.get_type_hints(cls.__init__)
    for name, value in options.items():
        if not fits_type(value, hints.get(name, typing.Any)):
            raise UserError(f"pool option {name}={value!r} of {kind} is not {type_name(hints[name])}: "
                            f"{cls.options[name]}")
        if name in cls.positive_options and value is not None and value < 1:
            raise UserError(f"pool option {name}={value!r} of {kind} must be at least 1: {cls.options[name]}")
    return cls(root=root, **options)


def fits_type(value: object, hint: object) -> bool:
    """Whether an option value (as TOML or --option gives it) fits an annotation of a pool's __init__."""
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(fits_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, str | Path)
    return isinstance(value, hint)


def type_name(hint: object) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return f"a list of {type_name(args[0])}"
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", Path: "a path",
             dict: "a table"}
    return names.get(hint, str(hint))
