"""`accelctl data prepare NAME` and `accelctl data ls`: tfds data sets, prepared ahead of time."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json

app = typer.Typer(
    help="Prepare and list tensorflow-datasets data sets (train with data.source: tfds).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        help="tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
        metavar="DIR",
    ),
]


@app.command("prepare")
def prepare_command(
    name: Annotated[
        str, typer.Argument(help="tfds name, e.g. mnist, cifar10, mnist:3.0.1.", metavar="NAME")
    ],
    data_dir: DataDir = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Download and prepare NAME as ArrayRecord (random access) so `train` can read it offline."""

    def go() -> dict[str, Any]:
        from accelctl.data import tfds_source

        return tfds_source.prepare(name, data_dir)

    result = run_guarded(go, debug=debug)
    if not write_json(result, json_out):
        state = "already prepared" if result["already_prepared"] else "prepared"
        splits = ", ".join(f"{k}: {v}" for k, v in result["splits"].items())
        typer.echo(f"{result['name']} {state} at {result['path']} ({splits})")


@app.command("ls")
def ls_command(data_dir: DataDir = None, json_out: JsonOut = None, debug: Debug = False) -> None:
    """List the data sets prepared under the tfds data folder."""

    def go() -> tuple[Any, list[dict[str, Any]]]:
        from accelctl.data.tfds_source import data_dir_of, list_prepared

        return data_dir_of(data_dir), list_prepared(data_dir)

    root, found = run_guarded(go, debug=debug)
    if write_json({"data_dir": str(root), "datasets": found}, json_out):
        return
    if not found:
        typer.echo(
            f"No prepared data sets under {root}. Prepare one with "
            f"`accelctl data prepare mnist --data-dir {root}`."
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tfds data sets in {root}")
    for col in ("name", "version", "format", "splits", "size"):
        table.add_column(col)
    for d in found:
        name = d["name"] + (f"/{d['config']}" if d["config"] else "")
        fmt = d["file_format"] + ("" if d["random_access"] else " (no random access)")
        splits = ", ".join(f"{k}: {v}" for k, v in d["splits"].items())
        table.add_row(name, d["version"], fmt, splits, f"{d['bytes'] / 2**20:.1f} MiB")
    Console().print(table)
