"""`accelctl eval --checkpoint PATH [CONFIG]`: eval metrics of a saved checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, SetOverrides, run_guarded, write_json


def eval_command(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            help="Run directory, its checkpoints/ folder (newest good one) or checkpoints/<step>.",
            metavar="RUN",
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Argument(
            help="YAML config; default: the config stored in the checkpoint.", metavar="CONFIG"
        ),
    ] = None,
    set_: SetOverrides = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Evaluate a checkpoint on the eval split and print loss and accuracy."""

    def go() -> dict[str, Any]:
        from accelctl import compile_cache
        from accelctl import config as config_mod
        from accelctl.train.checkpoint_eval import evaluate_checkpoint

        compile_cache.enable()

        if config is None:
            return evaluate_checkpoint(checkpoint, None, set_ or [])
        return evaluate_checkpoint(checkpoint, config_mod.load(config, set_ or []))

    result = run_guarded(go, debug=debug)
    for note in result["notes"]:
        print(f"accelctl: {note}", file=sys.stderr)
    if not write_json(result, json_out):
        _render(result)


def _render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = result["eval"]
    table = Table(title="accelctl eval", show_header=False)
    table.add_row("checkpoint", f"{result['checkpoint']} (step {result['step']})")
    table.add_row("eval accuracy", f"{ev['accuracy']:.4f}")
    table.add_row("eval loss", f"{ev['loss']:.4f}")
    table.add_row("examples", str(ev["count"]))
    Console().print(table)
