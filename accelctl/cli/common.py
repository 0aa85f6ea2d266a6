"""What every command shares: user errors as a clean message and their exit code (2 = bad input)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from accelctl.errors import PARAMS, AccelctlError

T = TypeVar("T")

# How the library's parameter names are spelled on the command line: library errors carry the
# parameter (`UserError(..., param="run_dir")`), and only here do they become flags.
FLAGS = {param: "--" + param.replace("_", "-") for param in PARAMS} | {
    "json_out": "--json",
    "overrides": "--set",
}


# Options every command spells the same way.
def _check_json_out(value: str | None) -> str | None:
    """Refuse an unwritable --json target before the command does its work."""
    if value is not None and value != "-":
        from accelctl.errors import UserError
        from accelctl.outputs import check_output_file

        try:
            check_output_file(Path(value), param="json_out")
        except UserError as e:
            print(f"error: {e.render(FLAGS)}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None
    return value


JsonOut = Annotated[
    str | None,
    typer.Option(
        "--json",
        help="Also write the result as JSON to PATH ('-': stdout).",
        callback=_check_json_out,
        metavar="PATH|-",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for input errors too.")]
SetOverrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a config field, e.g. --set optimizer.lr=3e-4 (repeatable).",
        metavar="KEY=VALUE",
    ),
]
CpuDevices = Annotated[
    int | None,
    typer.Option(
        "--cpu-devices",
        min=1,
        help="Split the host CPU into N devices (XLA:CPU runs each convolution on one thread; "
        "N = cores lets a conv net use them all). Default: JAX's (1, or JAX_NUM_CPU_DEVICES).",
        metavar="N|auto",
    ),
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def run_guarded(
    fn: Callable[[], T],
    *,
    debug: bool,
    advice_fn: Callable[[AccelctlError], str | None] | None = None,
) -> T:
    """Call `fn`; an AccelctlError becomes a one-paragraph message on stderr and its exit code.

    Internal bugs keep their traceback. With `debug`, reported errors show it too. Ctrl-C outside
    the training loop (which handles it itself) exits 130 without a traceback.

    Args:
        fn: the command's one library call.
        debug: re-raise instead (full traceback).
        advice_fn: a line to add for an error (e.g. the command that resumes), or None.
    """
    try:
        return fn()
    except AccelctlError as e:
        if debug:
            raise
        label = "error" if e.exit_code == EXIT_USAGE else "stopped"
        message = e.render(FLAGS)
        extra = advice_fn(e) if advice_fn is not None else None
        if message or extra:
            print(f"{label}: {message}" + (f" {extra}" if extra else ""), file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def write_json(result: Any, json_out: str | None) -> bool:
    """Write `--json` output: to stdout for "-", else to the file named (if any).

    Returns:
        True when it went to stdout, so the command prints nothing else there.
    """
    if json_out == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return True
    if json_out:
        from accelctl.outputs import write_result

        try:
            write_result(Path(json_out), json.dumps(result, indent=2) + "\n", param="json_out")
        except AccelctlError as e:
            print(f"stopped: {e.render(FLAGS)}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
    return False
