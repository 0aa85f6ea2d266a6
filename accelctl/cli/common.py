"""What every command shares: turning user errors into a clean message and exit code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


def write_json(result: Any, json_out: str | None) -> bool:
    """Write `--json` output: to stdout for "-", else to the file named (if any).

    Returns:
        True when it went to stdout, so the command prints nothing else there.
    """
    if json_out == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return True
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return False
