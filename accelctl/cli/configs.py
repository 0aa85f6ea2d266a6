"""`accelctl configs` lists the built-in configs; `accelctl init NAME [PATH]` copies one out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json


def configs_command(json_out: JsonOut = None) -> None:
    """List the built-in configs (train one by name: `accelctl train digits_mlp`)."""
    from accelctl.config import builtin

    rows = [{"name": n, "description": builtin.first_comment(n)} for n in builtin.names()]
    if write_json({"configs": rows}, json_out):
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in configs (accelctl init NAME copies one for editing)")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    for r in rows:
        table.add_row(r["name"], r["description"])
    Console().print(table)


def init_command(
    name: Annotated[
        str, typer.Argument(help="A built-in config (see `accelctl configs`).", metavar="NAME")
    ],
    path: Annotated[
        Path | None, typer.Argument(help="Where to write it; default: ./NAME.yaml.", metavar="PATH")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    debug: Debug = False,
) -> None:
    """Copy a built-in config into a file you can edit, then train it: accelctl train PATH."""

    def go() -> Any:
        from accelctl.config import builtin
        from accelctl.errors import UserError

        if builtin.find(name) is None:
            raise UserError(
                f"no built-in config {name!r}; choose one of {', '.join(builtin.names())}"
            )
        target = path or Path(f"{name.removesuffix('.yaml')}.yaml")
        if target.is_dir():
            target = target / f"{name.removesuffix('.yaml')}.yaml"
        if target.exists() and not force:
            raise UserError(
                f"{target} already exists; nothing was overwritten (choose another path or "
                "add --force)"
            )
        try:
            target.write_text(builtin.text(name), encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {target}: {e.strerror or e}") from None
        return target

    target = run_guarded(go, debug=debug)
    typer.echo(f"wrote {target}; train it with: accelctl train {target}")
