"""Errors a user can cause, and how command-line entry points report them.

Anything raised as :class:`UserError` ends the command with a one-line message
(problem and fix) and exit code 2, never a traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer


class UserError(Exception):
    """A problem with the user's input; the message says what to do about it."""


EXIT_USER_ERROR = 2


def run_app(app: typer.Typer, argv: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """Run a typer app; a :class:`UserError` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name=prog_name)
    except UserError as err:
        message = " ".join(str(err).split())
        sys.stderr.write(f"error: {message}\n")  # one write: ranks of a torchrun job share the stream
        raise SystemExit(EXIT_USER_ERROR) from None
