"""What every command shares: turning user errors into a clean message and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from accelctl.errors import UserError

T = TypeVar("T")

EXIT_USAGE = 2


def run_guarded(fn: Callable[[], T], *, debug: bool) -> T:
    """Call `fn`; a UserError becomes a one-paragraph message on stderr and exit code 2.

    Internal bugs keep their traceback. With `debug`, user errors show it too.
    """
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
