"""`accelctl bench [CONFIG ...]`: measured step time, compile time, throughput, MFU, memory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import Debug, JsonOut, run_guarded, write_json
from accelctl.cli.train import CpuDevicesAuto, parse_cpu_devices, print_profile
from accelctl.errors import UserError

EXIT_REGRESSION = 4


def bench_command(
    configs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Config files; none = the built-in suite (MLP, CNN, ResNet-20, tiny GPT).",
            metavar="CONFIG",
        ),
    ] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(
            "--batch-size",
            help="Global batch size (repeatable); default: the config's.",
            metavar="N",
        ),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(
            "--precision",
            help="Compute dtype (repeatable): fp32, bf16, fp16.",
            metavar="fp32|bf16|fp16",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Timed steps.", metavar="N")] = 50,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed warm-up steps.", metavar="N")
    ] = 5,
    find_max_batch: Annotated[
        bool,
        typer.Option(
            "--find-max-batch",
            help="Instead of timing: the largest batch whose step fits device memory (from "
            "compiled memory analysis, as `accelctl plan` reads it; nothing is allocated).",
        ),
    ] = False,
    memory_limit: Annotated[
        float | None,
        typer.Option(
            "--memory-limit",
            help="Bytes per device for --find-max-batch (CPU needs it).",
            metavar="BYTES",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline", help="A previous --json result: exit 4 on a regression.", metavar="FILE"
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance", min=0, help="Allowed samples/s drop in percent.", metavar="PERCENT"
        ),
    ] = 5.0,
    cpu_devices: CpuDevicesAuto = "auto",
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            metavar="DIR",
            help="Also trace a repeat of each workload's timed bare-step window with "
            "jax.profiler into DIR/<workload>-b<batch>-<dtype>/ and print its most expensive "
            "device operations.",
        ),
    ] = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Benchmark the training step of each config (or the built-in suite) on these devices."""

    def go() -> dict[str, Any]:
        from accelctl import bench
        from accelctl.devices import apply_cpu_devices, choose_cpu_devices_for
        from accelctl.outputs import check_output_dir
        from accelctl.precision import COMPUTE_DTYPES

        requested = parse_cpu_devices(cpu_devices)
        for p in precision or []:
            if p not in COMPUTE_DTYPES:
                raise UserError(f"--precision {p}: choose {', '.join(COMPUTE_DTYPES)}")
        if profile is not None:
            try:
                check_output_dir(profile, param="profile")
            except UserError as e:
                raise UserError(f"--profile {profile}: {e.message}") from None
        prior = bench.load_baseline(baseline) if baseline else None
        workloads = _workloads(configs or [])
        # The configs decide the CPU device count (auto), which must be set before JAX starts.
        apply_cpu_devices(choose_cpu_devices_for(requested, workloads))
        if find_max_batch:
            limit = int(memory_limit) if memory_limit is not None else None
            return bench.find_max_batches(workloads, memory_limit=limit)
        result = bench.run_bench(
            workloads,
            batch_sizes=batch_size,
            precisions=precision,
            steps=steps,
            warmup=warmup,
            progress_fn=lambda line: print(f"bench {line}", file=sys.stderr, flush=True),
            profile_dir=profile,
        )
        if prior is not None:
            result["baseline"] = {
                "path": str(baseline),
                "tolerance_pct": tolerance,
                "rows": bench.compare(result["results"], prior, tolerance),
            }
        return result

    def guarded_go() -> dict[str, Any]:
        from accelctl.memory.runtime import stop_on_out_of_memory

        with stop_on_out_of_memory():  # a workload that runs out of memory: one clean message
            return go()

    result = run_guarded(guarded_go, debug=debug)
    if not write_json(result, json_out):
        _render(result)
    rows = result.get("baseline", {}).get("rows", [])
    regressed = [r for r in rows if r["regressed"]]
    for r in regressed:
        print(
            f"regression: {r['workload']} batch {r['batch_size']} {r['precision']}: "
            f"{r['samples_per_s']:.0f} samples/s against {r['baseline_samples_per_s']:.0f} in "
            f"the baseline, {r['drop_pct']:.1f}% slower (tolerance {tolerance}%"
            + (
                f"; the repeated windows of these runs spread by up to {r['noise_pct']:.1f}%"
                if r.get("noise_pct") is not None
                else ""
            )
            + ")",
            file=sys.stderr,
        )
    if regressed:
        raise typer.Exit(EXIT_REGRESSION)


def _workloads(paths: list[Path]) -> list[tuple[str, Any]]:
    from accelctl import bench
    from accelctl import config as config_mod

    if not paths:
        return [(name, bench.builtin_config(name)) for name in bench.BUILTIN]
    # Validated (and located errors) before anything runs.
    return [(Path(path).stem, config_mod.load(path)) for path in paths]


def _render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for every column even when not on a terminal (which Rich takes as 80 wide).
    console = Console(width=max(Console().width, 160))
    if "find_max_batch" in result:
        table = Table(title="accelctl bench --find-max-batch")
        for col in ("workload", "max batch", "bytes/device", "limit"):
            table.add_column(col)
        for r in result["find_max_batch"]:
            table.add_row(
                r["workload"],
                str(r["max_batch_size"]),
                f"{r['bytes_per_device'] / 1e6:.1f} MB",
                f"{r['memory_limit_bytes'] / 1e6:.1f} MB",
            )
        console.print(table)
        return
    table = Table(title=f"accelctl bench — {result['machine']}")
    cols = (
        "workload",
        "batch",
        "dtype",
        "compile cold/warm s",
        "step ms (p50/p90)",
        "samples/s",
        "TFLOP/s",
        "MFU",
        "memory MB",
        "H2D GB/s",
        "loop/bare",
        "input wait",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in result["results"]:
        st, mem = r["step_time_s"], r["memory"]
        table.add_row(
            r["workload"],
            str(r["batch_size"]),
            r["precision"],
            f"{r['compile_s']['cold']:.2f}/{r['compile_s']['warm']:.2f}",
            f"{st['median'] * 1e3:.2f}/{st['p90'] * 1e3:.2f}",
            f"{r['samples_per_s']:.0f}"
            + (f" ({r['tokens_per_s'] / 1e3:.0f}k tok/s)" if r.get("tokens_per_s") else ""),
            f"{r['flops_per_s'] / 1e12:.3f}" if r["flops_per_s"] else "n/a",
            # The count MFU is taken from: the model's FLOPs (transformers) or XLA's.
            f"{r['mfu']:.1%} ({r['mfu_flops']})" if r["mfu"] is not None else "n/a",
            f"{mem['total_bytes'] / 1e6:.1f}",
            f"{r['h2d']['bytes_per_s'] / 1e9:.2f}",
            f"{r['loop']['vs_bare_step']:.2f}",
            f"{r['loop']['input_wait_fraction']:.1%}",
        )
    console.print(table)
    cpu = result.get("cpu_devices")
    if cpu and result["results"] and result["results"][0]["platform"] == "cpu":
        console.print(f"CPU devices: {cpu['count']} ({cpu['reason']})", highlight=False)
    for r in result["results"]:
        if r.get("profile"):
            print_profile(
                r["profile"], title=f"{r['workload']} b{r['batch_size']} {r['precision']}"
            )
