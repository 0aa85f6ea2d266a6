"""`accelctl predict RUN INPUT`: the class of every row (or image) with a trained classifier."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json
from accelctl.cli.export import RunArg


def predict_command(
    run: RunArg,
    inputs: Annotated[
        Path,
        typer.Argument(
            help="An .npz with the inputs under the run's data.x_key (labels under data.y_key "
            "optional), or a folder of PNG/JPEG images of the model's input size.",
            show_default=False,
            metavar="INPUT",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the predictions: .npz (pred, probs, y) or .csv (one line per row).",
            metavar="FILE",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Rows per batch over all devices (default: the run's eval batch size).",
            metavar="N",
        ),
    ] = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Predict classes and class probabilities; with labels, also the accuracy."""

    def go() -> dict[str, Any]:
        from accelctl import compile_cache
        from accelctl.predict import predict

        compile_cache.enable()
        return predict(run, inputs, out=out, batch_size=batch_size)

    result = run_guarded(go, debug=debug)
    for note in result["notes"]:
        print(f"accelctl: {note}", file=sys.stderr)
    if not write_json(result, json_out):
        _render(result)


def _render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accelctl predict", show_header=False)
    table.add_row("checkpoint", f"{result['checkpoint']} (step {result['step']})")
    table.add_row("rows", f"{result['rows']} ({result['rows_per_s']:.0f} rows/s)")
    if result["accuracy"] is not None:
        table.add_row("accuracy", f"{result['accuracy']:.4f}")
    counts = result["classes"]
    top = sorted(range(len(counts)), key=lambda c: -counts[c])[:10]
    shown = ", ".join(f"{c}: {counts[c]}" for c in top if counts[c])
    more = sum(1 for c in range(len(counts)) if counts[c]) - len([c for c in top if counts[c]])
    table.add_row("predicted", shown + (f", ... ({more} more classes)" if more > 0 else ""))
    if result["out"]:
        table.add_row("wrote", result["out"])
    Console().print(table)
