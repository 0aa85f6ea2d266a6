"""`accelctl export RUN --out FILE`: a run's weights as one safetensors / npz file (or GPT-2's
Hugging Face layout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json

RunArg = Annotated[
    Path,
    typer.Argument(
        help="Run directory, its checkpoints/ folder (newest good checkpoint) or "
        "checkpoints/<step>.",
        show_default=False,
        metavar="RUN",
    ),
]


def export_command(
    run: RunArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="File to write (replaced if it exists); hf_gpt2 writes config.json beside it.",
            show_default=False,
            metavar="FILE",
        ),
    ],
    step: Annotated[
        int | None,
        typer.Option(
            "--step", min=0, help="Export this step (default: the newest good one).", metavar="N"
        ),
    ] = None,
    format_: Annotated[
        Literal["safetensors", "npz", "hf_gpt2"] | None,
        typer.Option(
            "--format",
            help="safetensors, npz, or hf_gpt2 (GPT-2's Hugging Face layout, for transformers "
            "with learned positions and tied embeddings). Default: by the --out suffix "
            "(.npz: npz, else safetensors).",
            show_default=False,
            metavar="safetensors|npz|hf_gpt2",
        ),
    ] = None,
    dtype: Annotated[
        Literal["fp32", "bf16"],
        typer.Option(
            "--dtype",
            help="Floating-point arrays as fp32 or bf16 (half the size).",
            metavar="fp32|bf16",
        ),
    ] = "fp32",
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Write a run's parameters and model state to one file, named by module path.

    The file also holds the run's config, the step and params_sha256 (summary.json's, for fp32).

    Start a run from it with model.init_from.
    """

    def go() -> dict[str, Any]:
        from accelctl import compile_cache, distributed
        from accelctl.export import export

        spec = distributed.resolve()  # a launched job / SLURM: every process gathers, 0 writes
        if spec is not None:
            distributed.initialize(spec)
        compile_cache.enable()
        return export(run, out, step=step, format=format_, dtype=dtype)

    result = run_guarded(go, debug=debug)
    if not is_main_process():
        return
    for note in result["notes"]:
        print(f"accelctl: {note}", file=sys.stderr)
    if not write_json(result, json_out):
        _render(result)


def is_main_process() -> bool:
    """Whether this process reports (process 0 of a multi-process job, or the only one)."""
    import jax

    return jax.process_index() == 0


def _render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accelctl export", show_header=False)
    table.add_row("checkpoint", f"{result['checkpoint']} (step {result['step']})")
    table.add_row("wrote", f"{result['out']} ({result['bytes'] / 1e6:.2f} MB)")
    if result["config_json"]:
        table.add_row("config", result["config_json"])
    table.add_row("format", f"{result['format']}, {result['dtype']}")
    table.add_row("arrays", f"{result['arrays']} ({result['num_params']:,} parameters)")
    table.add_row("params_sha256", result["params_sha256"])
    table.add_row("time", f"{result['seconds']:.2f} s")
    Console().print(table)
