"""Run configurations: one dataclass per command holds every option with its one default, and checks its
values when it is built, so a Python caller meets the same checks as the command line.

A command's function takes its options as typer parameters whose defaults are read from the dataclass
(``= ScoreConfig.batch_size``) and hands them over with :func:`config_from`, so an option is written
twice (its type and default in the dataclass, its help on the command line) and never copied by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

from curate.errors import UserError

Config = TypeVar("Config")


def config_from(cls: type[Config], values: Mapping[str, Any], **extra: Any) -> Config:
    """``cls`` built from the entries of ``values`` (a command's ``locals()``) that are fields of it."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and k not in extra}, **extra)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least(minimum: float, **values: float | None) -> None:
    """Each given option, unless None, is a number ``>= minimum`` (NaN is not)."""
    for name, value in values.items():
        if value is not None and not value >= minimum:
            raise UserError(f"{flag(name)} {value} is not >= {minimum}: give {flag(name)} >= {minimum}")


def positive(**values: float | None) -> None:
    """Each given option, unless None, is a finite number ``> 0``."""
    for name, value in values.items():
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"{flag(name)} {value} is not a positive number: give {flag(name)} > 0")


def one_of(choices: Iterable[str], **values: str) -> None:
    choices = tuple(choices)
    for name, value in values.items():
        if value not in choices:
            raise UserError(f"unknown {flag(name)} {value!r}: choose one of {', '.join(choices)}")
