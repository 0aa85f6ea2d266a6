"""`accelctl compare-devices [CONFIG]`: one workload on every backend and device count."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json

DEFAULT_WORKLOAD = "mnist_cnn"


def compare_command(
    config: Annotated[
        Path | None,
        typer.Argument(help=f"Config file; default: the built-in {DEFAULT_WORKLOAD} workload."),
    ] = None,
    cpu_devices: Annotated[
        int | None,
        typer.Option(
            "--cpu-devices",
            min=1,
            help="Host devices for the multi-device CPU sets; default: the cores (2 to 8).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Timed steps per set.")] = 30,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps per set.")] = 5,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds per device set before it fails.")
    ] = 600,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw a bar chart to this PNG file.")
    ] = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Measure one workload on the CPU (1 and N devices) and every accelerator (1 device, all
    devices, pmap), each in its own process, and compare throughput and scaling."""

    def go() -> dict[str, Any]:
        from accelctl import bench, compare
        from accelctl import config as config_mod
        from accelctl.errors import UserError

        if plot is not None and not plot.parent.is_dir():
            raise UserError(f"--plot {plot}: the folder {plot.parent} does not exist")
        if config is None:
            name, cfg = DEFAULT_WORKLOAD, bench.builtin_config(DEFAULT_WORKLOAD)
        else:
            name, cfg = config.stem, config_mod.load(config)  # validated first
        n = cpu_devices or max(2, min(os.cpu_count() or 2, 8))
        result = compare.compare_devices(
            name,
            cfg,
            cpu_devices=n,
            steps=steps,
            warmup=warmup,
            timeout=timeout,
            progress_fn=lambda line: print(f"compare {line}", file=sys.stderr, flush=True),
        )
        if plot is not None:
            compare.plot_compare(result, plot)
            result["plot"] = str(plot)
        return result

    result = run_guarded(go, debug=debug)
    if not write_json(result, json_out):
        _render(result)


def _render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title=f"accelctl compare-devices — {result['workload']} ({result['cpu']})")
    cols = (
        "device",
        "count",
        "strategy",
        "samples/s",
        "step ms",
        "compile s",
        "MFU",
        "memory MB/dev",
        "vs CPU",
        "scaling eff.",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "device" else "right")
    for r in result["rows"]:
        head = [r["device_kind"] or r["platform"], str(r["devices"]), r["strategy"]]
        if r["error"]:
            table.add_row(*head, f"failed: {r['error']}", *[""] * 6)
            continue
        table.add_row(
            *head,
            f"{r['samples_per_s']:.0f}",
            f"{r['step_time_median_s'] * 1e3:.2f}",
            f"{r['compile_s']:.2f}",
            f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
            f"{r['memory_bytes_per_device'] / 1e6:.1f}",
            f"{r['speedup_vs_cpu']:.2f}x" if r["speedup_vs_cpu"] else "-",
            f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] else "-",
        )
    console.print(table)
    if result["note"]:
        console.print(result["note"])
