"""`accelctl launch -n N CONFIG [train options]`: a multi-process training job on this host."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Literal

import typer

from accelctl.cli.common import Debug, run_guarded


def launch_command(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Argument(help="YAML config file, as for `accelctl train`.", metavar="CONFIG")
    ],
    num_processes: Annotated[
        int, typer.Option("-n", "--num-processes", min=1, help="Processes to start.", metavar="N")
    ],
    devices_per_process: Annotated[
        int,
        typer.Option(
            "--devices-per-process",
            min=1,
            help="CPU: host devices per process; GPU: GPUs per process.",
            metavar="K",
        ),
    ] = 1,
    platform: Annotated[
        Literal["auto", "cpu", "gpu"],
        typer.Option(
            "--platform", help="auto: gpu when GPUs are visible, else cpu.", metavar="auto|cpu|gpu"
        ),
    ] = "auto",
    debug: Debug = False,
) -> None:
    """Start N `accelctl train` processes joined by jax.distributed on this host.

    Every further option goes to each `accelctl train` process: --set KEY=VALUE, --run-dir DIR,
    --resume, --quiet, --json PATH|-, --profile START:COUNT, --dist-timeout SECONDS,
    --heartbeat-timeout SECONDS (`accelctl train --help` describes them).
    Output is prefixed with the process index; if one process fails the others are stopped and
    launch exits with its code.
    """
    train_args = [str(config), *ctx.args]

    def go() -> int:
        from accelctl import config as config_mod
        from accelctl import launch
        from accelctl.train import default_run_dir

        chosen, gpus = launch.choose_platform(platform)
        args = list(train_args)
        if "--run-dir" not in args:  # every process must write into the same run directory
            cfg = config_mod.load(config)
            args += ["--run-dir", str(default_run_dir(cfg, config.stem))]
        envs = launch.process_envs(
            num_processes, devices_per_process, chosen, launch.free_port(), gpus
        )
        code = launch.run_processes(args, envs)
        if code == launch.PREEMPTED:
            resume = [] if "--resume" in args else ["--resume"]
            again = ["accelctl", "launch", "-n", str(num_processes)]
            if devices_per_process != 1:
                again += ["--devices-per-process", str(devices_per_process)]
            if platform != "auto":
                again += ["--platform", platform]
            print(
                f"[launch] the {num_processes} processes stopped together and wrote a checkpoint "
                f"(exit 75). Continue with: {shlex.join([*again, *args, *resume])}",
                flush=True,
            )
        return code

    raise typer.Exit(run_guarded(go, debug=debug))
