"""`accelctl plot RUN_DIR [RUN_DIR ...] [-o out.png]`: loss, accuracy, LR and throughput figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json


def plot_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories of `accelctl train` (each holds metrics.jsonl).",
            metavar="RUN_DIR",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Image to write (.png, .pdf, .svg); default: RUN_DIR/plot.png.",
            metavar="FILE",
        ),
    ] = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Plot loss, accuracy, learning rate and samples/s against the step, runs overlaid."""

    def go() -> dict[str, Any]:
        from accelctl.plot import plot_runs

        return plot_runs(run_dirs, output)

    result = run_guarded(go, debug=debug)
    if not write_json(result, json_out):
        runs = ", ".join(r["name"] for r in result["runs"])
        print(f"wrote {result['path']} ({result['panels']} panels; runs: {runs})")
