"""`accelctl train CONFIG`: load the config, run `accelctl.train.train`, print the summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from accelctl.cli.common import (
    CpuDevices,
    Debug,
    JsonOut,
    SetOverrides,
    run_guarded,
    write_json,
)
from accelctl.errors import AccelctlError, Preempted, UserError


def train_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="YAML config file, or a built-in config's name (`accelctl configs` lists them)."
        ),
    ],
    set_: SetOverrides = None,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="Run directory (default: runs/<config-name>-<timestamp>/)."),
    ] = None,
    json_out: JsonOut = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --run-dir from its newest good checkpoint.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    cpu_devices: CpuDevices = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            help="Multi-process: HOST:PORT of process 0 (or ACCELCTL_COORDINATOR; SLURM and "
            "Open MPI are detected).",
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option("--num-processes", min=1, help="Multi-process: processes in the job."),
    ] = None,
    process_id: Annotated[
        int | None, typer.Option("--process-id", min=0, help="Multi-process: this one's index.")
    ] = None,
    dist_timeout: Annotated[
        int,
        typer.Option(
            "--dist-timeout", min=1, help="Seconds to wait for every process to join the job."
        ),
    ] = 300,
    heartbeat_timeout: Annotated[
        int,
        typer.Option(
            "--heartbeat-timeout",
            min=1,
            help="A process silent this long (dead or hung) makes the others fail.",
        ),
    ] = 100,
    debug: Debug = False,
) -> None:
    """Train a model as the config describes (or continue a run with --resume).

    Writes config.yaml, metrics.jsonl, checkpoints/ and summary.json into the run directory.
    Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 preempted (checkpoint written; resume).
    """

    def go() -> dict:
        from accelctl import compile_cache, distributed
        from accelctl import config as config_mod
        from accelctl.devices import set_cpu_devices
        from accelctl.train import default_run_dir, train

        if cpu_devices is not None:
            set_cpu_devices(cpu_devices)
        spec = distributed.resolve(coordinator, num_processes, process_id)
        if spec is not None and run_dir is None:
            raise UserError(
                "a multi-process run needs --run-dir: the same folder, on a filesystem every "
                "process sees, for all of them (process 0 writes the logs; checkpoints are "
                "written by all)"
            )
        if spec is not None:  # before anything else touches JAX
            distributed.initialize(spec, timeout_s=dist_timeout, heartbeat_s=heartbeat_timeout)
        compile_cache.enable()

        cfg = config_mod.load(config, set_ or [])
        if resume and run_dir is None:
            raise UserError("--resume needs --run-dir: the run directory to continue")
        target = run_dir or default_run_dir(cfg, config.stem)
        main = spec is None or _process_index() == 0
        return train(
            cfg, run_dir=target, quiet=quiet or not main, description=config.stem, resume=resume
        )

    def advice(e: AccelctlError) -> str | None:
        if not isinstance(e, Preempted) or e.checkpoint is None:
            return None
        from accelctl.launch import ENV_LAUNCHED

        if os.environ.get(ENV_LAUNCHED):
            return None  # `accelctl launch` says how to continue the whole job, once
        return (
            f"Continue with: accelctl train {Path(e.run_dir) / 'config.yaml'} --run-dir "
            f"{e.run_dir} --resume"
        )

    summary = run_guarded(go, debug=debug, advice_fn=advice)
    if _process_index() != 0:
        return  # process 0 reports for the whole job
    if not write_json(summary, json_out):
        _render(summary, quiet=quiet)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _render(summary: dict, *, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = summary["final_eval"]
    table = Table(title="accelctl train", show_header=False)
    table.add_row("eval accuracy", f"{ev['accuracy']:.4f}")
    table.add_row("eval loss", f"{ev['loss']:.4f}")
    table.add_row("steps", f"{summary['steps']} ({summary['epochs']:.1f} epochs)")
    table.add_row("devices", f"{summary['devices']} x {summary['device_kind']}")
    table.add_row("train samples/s", f"{summary['train_samples_per_s']:.0f}")
    table.add_row("input wait", f"{summary['input_wait_fraction']:.1%}")
    table.add_row("compile", f"{summary['compile_time_s']:.2f} s")
    table.add_row("wall time", f"{summary['wall_time_s']:.2f} s")
    if summary.get("skipped_steps"):
        table.add_row("skipped steps", f"{summary['skipped_steps']} (non-finite)")
    if summary.get("checkpoint"):
        table.add_row("checkpoint", summary["checkpoint"])
    table.add_row("run dir", summary["run_dir"])
    Console().print(table)
