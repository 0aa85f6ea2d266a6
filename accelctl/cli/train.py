"""`accelctl train CONFIG`: load the config, run `accelctl.train.train`, print the summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import (
    Debug,
    JsonOut,
    SetOverrides,
    run_guarded,
    write_json,
)
from accelctl.errors import AccelctlError, Preempted, UserError

# `--cpu-devices` of the commands that choose it from the config (train, bench): a count, or
# auto (the default), decided before JAX starts (accelctl.devices.choose_cpu_devices).
CpuDevicesAuto = Annotated[
    str,
    typer.Option(
        "--cpu-devices",
        help="Split the host CPU into N XLA devices, or auto: one per core (2 to 8) for models "
        "with convolutions when the CPU is the backend (XLA:CPU runs each convolution on one "
        "thread), else 1. XLA_FLAGS' --xla_force_host_platform_device_count or "
        "JAX_NUM_CPU_DEVICES win over auto. summary.json records the count and why.",
        metavar="N|auto",
    ),
]


def parse_cpu_devices(value: str) -> int | str:
    """`--cpu-devices` as a count or "auto"; a clean usage error otherwise."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--cpu-devices {value}: give a count of at least 1, or auto")
    return n


def train_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="YAML config file, or a built-in config's name (`accelctl configs` lists them).",
            metavar="CONFIG",
        ),
    ],
    set_: SetOverrides = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            help="Run directory (default: runs/<config-name>-<timestamp>/).",
            metavar="DIR",
        ),
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
    cpu_devices: CpuDevicesAuto = "auto",
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            metavar="START:COUNT",
            help="Trace steps START to START+COUNT-1 with jax.profiler into <run dir>/profile/ "
            "(TensorBoard's profile plugin / XProf, Perfetto) and print the most expensive "
            "device operations and the input wait over those steps.",
        ),
    ] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            help="Multi-process: HOST:PORT of process 0 (or ACCELCTL_COORDINATOR; SLURM and "
            "Open MPI are detected).",
            metavar="HOST:PORT",
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes", min=1, help="Multi-process: processes in the job.", metavar="N"
        ),
    ] = None,
    process_id: Annotated[
        int | None,
        typer.Option("--process-id", min=0, help="Multi-process: this one's index.", metavar="I"),
    ] = None,
    dist_timeout: Annotated[
        int,
        typer.Option(
            "--dist-timeout",
            min=1,
            help="Seconds to wait for every process to join the job.",
            metavar="SECONDS",
        ),
    ] = 300,
    heartbeat_timeout: Annotated[
        int,
        typer.Option(
            "--heartbeat-timeout",
            min=1,
            help="A process silent this long (dead or hung) makes the others fail.",
            metavar="SECONDS",
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
        from accelctl import profile as profile_mod
        from accelctl.devices import apply_cpu_devices, choose_cpu_devices
        from accelctl.train import default_run_dir, train

        requested = parse_cpu_devices(cpu_devices)
        if profile is not None:  # a malformed window is refused before JAX starts
            try:
                profile_mod.parse_window(profile)
            except ValueError as e:
                raise UserError(f"--profile {profile}: {e}") from None
        spec = distributed.resolve(coordinator, num_processes, process_id)
        if spec is not None and run_dir is None:
            raise UserError(
                "a multi-process run needs --run-dir: the same folder, on a filesystem every "
                "process sees, for all of them (process 0 writes the logs; checkpoints are "
                "written by all)"
            )
        if resume and run_dir is None:
            raise UserError("--resume needs --run-dir: the run directory to continue")
        # The config decides the CPU device count (auto), which must be set before JAX starts.
        cfg = config_mod.load(config, set_ or [])
        apply_cpu_devices(choose_cpu_devices(requested, cfg, multi_process=spec is not None))
        if spec is not None:  # before anything else touches JAX
            distributed.initialize(spec, timeout_s=dist_timeout, heartbeat_s=heartbeat_timeout)
        compile_cache.enable()

        target = run_dir or default_run_dir(cfg, config.stem)
        main = spec is None or _process_index() == 0
        return train(
            cfg,
            run_dir=target,
            quiet=quiet or not main,
            description=config.stem,
            resume=resume,
            profile=profile,
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
    # The process's real wall time, and where it went (the parts add up to it).
    parts = summary.get("time_s") or {}
    shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v >= 0.05)
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s" + (f" ({shown})" if shown else ""))
    if summary.get("skipped_steps"):
        table.add_row("skipped steps", f"{summary['skipped_steps']} (non-finite)")
    if summary.get("checkpoint"):
        table.add_row("checkpoint", summary["checkpoint"])
    table.add_row("run dir", summary["run_dir"])
    Console().print(table)
    if summary.get("profile"):
        print_profile(summary["profile"])


def print_profile(p: dict[str, Any], title: str = "profile") -> None:
    """The most expensive device operations of a trace (accelctl.profile.summarize), with the
    input wait over the traced steps and where the trace is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    first, last = p["steps"]
    wait = p.get("input_wait_fraction")
    head = f"{title}: steps {first}-{last}, {p['wall_s'] * 1e3:.1f} ms wall"
    if wait is not None:
        head += f", input wait {wait:.1%} of it"
    if p.get("device_ms") is not None:
        head += f", device ops {p['device_ms']:.1f} ms over {p['devices']} device(s)"
    console.print(head, highlight=False)
    table = Table()
    for col in ("device operation", "total ms", "share", "count"):
        table.add_column(col, justify="left" if col == "device operation" else "right")
    for r in p["top_ops"]:
        table.add_row(r["name"], f"{r['total_ms']:.2f}", f"{r['share']:.1%}", str(r["count"]))
    console.print(table)
    if p.get("error"):
        console.print(f"profile: {p['error']}", highlight=False)
    console.print(
        f"trace: {p['trace'] or p['dir']} (tensorboard --logdir {p['dir']}; or open the "
        ".trace.json.gz in ui.perfetto.dev)",
        highlight=False,
    )
