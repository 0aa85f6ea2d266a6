"""The `accelctl` command line (Typer). Importing this module must not import jax."""

from __future__ import annotations

from typing import Annotated

import typer

from accelctl import __version__
from accelctl.cli.bench import bench_command
from accelctl.cli.compare import compare_command
from accelctl.cli.configs import configs_command, init_command
from accelctl.cli.data import app as data_app
from accelctl.cli.env import env_command
from accelctl.cli.eval import eval_command
from accelctl.cli.export import export_command
from accelctl.cli.generate import generate_command
from accelctl.cli.launch import launch_command
from accelctl.cli.plan import plan_command
from accelctl.cli.plot import plot_command
from accelctl.cli.predict import predict_command
from accelctl.cli.train import train_command

app = typer.Typer(
    name="accelctl",
    help="A command-line training accelerator for JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help (Typer's rich panels print flags as `<bool>` and types as `<int range>`).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"accelctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Train, benchmark and compare JAX models from one YAML config."""


app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("export")(export_command)
app.command("predict")(predict_command)
app.command("generate")(generate_command)
app.command("plot")(plot_command)
app.command("bench")(bench_command)
app.command("plan")(plan_command)
app.command("env")(env_command)
app.command("compare-devices")(compare_command)
app.command("configs")(configs_command)
app.command("init")(init_command)
app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    launch_command
)
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point."""
    from accelctl.cli.common import FLAGS
    from accelctl.errors import set_display_names

    # Errors printed outside a command's handler (the hang watchdog's thread) name flags too.
    set_display_names(FLAGS)
    app()
