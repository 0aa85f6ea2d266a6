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
        typer.Argument(
            help=f"Config file; default: the built-in {DEFAULT_WORKLOAD} workload.",
            metavar="CONFIG",
        ),
    ] = None,
    cpu_devices: Annotated[
        int | None,
        typer.Option(
            "--cpu-devices",
            min=1,
            help="Host devices for the multi-device CPU sets; default: the cores (2 to 8).",
            metavar="N|auto",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=2, help="Timed steps per set.", metavar="N")
    ] = 30,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Warm-up steps per set.", metavar="N")
    ] = 5,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=1, help="Seconds per device set before it fails.", metavar="SECONDS"
        ),
    ] = 600,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also draw a bar chart to this PNG file.", metavar="FILE.png"),
    ] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="All columns (step time, compile, memory) in the table.")
    ] = False,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Measure one workload on every device set and compare throughput and scaling.

    Device sets: the CPU with 1 and N devices, and each accelerator backend with 1 device, all
    devices (dp) and pmap; each set is measured by its own `accelctl bench` process.
    """

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
        _render(result, wide=wide)


def _render(result: dict[str, Any], *, wide: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()  # the terminal's width (COLUMNS when set); --wide for every column
    table = Table(title=f"accelctl compare-devices — {result['workload']} ({result['cpu']})")
    # (header, cell) in the order shown; the wide ones only with --wide.
    cols: list[tuple[str, Any]] = [
        ("device", lambda r: r["device_kind"] or r["platform"]),
        ("n", lambda r: str(r["devices"])),
        ("strategy", lambda r: r["strategy"]),
        ("samples/s", lambda r: f"{r['samples_per_s']:,.0f}"),
    ]
    if wide:
        cols += [
            ("step ms", lambda r: f"{r['step_time_median_s'] * 1e3:.2f}"),
            ("compile s", lambda r: f"{r['compile_s']:.2f}"),
            ("MB/device", lambda r: f"{r['memory_bytes_per_device'] / 1e6:.1f}"),
        ]
    cols += [
        ("MFU", lambda r: f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"),
        ("vs CPU", lambda r: f"{r['speedup_vs_cpu']:.2f}x" if r["speedup_vs_cpu"] else "-"),
        ("scaling", lambda r: f"{r['scaling_efficiency']:.0%}" if r["scaling_efficiency"] else "-"),
    ]
    for header, _ in cols:
        table.add_column(header, justify="left" if header == "device" else "right")
    failures = []
    for r in result["rows"]:
        head = [cell(r) for _, cell in cols[:3]]
        if r["error"]:
            failures.append(f"[{len(failures) + 1}] {' x '.join(head[:2])} {head[2]}: {r['error']}")
            table.add_row(*head, f"failed [{len(failures)}]", *[""] * (len(cols) - 4))
            continue
        table.add_row(*[cell(r) for _, cell in cols])
    console.print(table)
    for line in failures:
        console.print(line, highlight=False)
    if result["note"]:
        console.print(result["note"])
