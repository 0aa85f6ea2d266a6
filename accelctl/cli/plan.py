"""`accelctl plan CONFIG`: a dry run; what one training step needs on these devices, and whether
it fits, from the train step compiled ahead of time (nothing allocated, no data read where the
config describes it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from accelctl.cli.common import CpuDevices, Debug, JsonOut, SetOverrides, run_guarded, write_json
from accelctl.errors import UserError


def plan_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="YAML config file, or a built-in config's name (`accelctl configs` lists them).",
            metavar="CONFIG",
        ),
    ],
    set_: SetOverrides = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, help="Global batch size (default: the config's).", metavar="N"
        ),
    ] = None,
    memory_limit: Annotated[
        float | None,
        typer.Option(
            "--memory-limit",
            help="Bytes per device to plan against, e.g. 80e9 (default: the device's own; the "
            "CPU has none).",
            metavar="BYTES",
        ),
    ] = None,
    cpu_devices: CpuDevices = None,
    json_out: JsonOut = None,
    debug: Debug = False,
) -> None:
    """Plan a training step: memory per device, FLOPs, a roofline step time, whether it fits.

    The train step is compiled for the backend present, from abstract inputs: no parameter is
    allocated and nothing is placed on the devices. When it does not fit, remat, gradient
    accumulation, fsdp and a smaller batch are each planned again until one fits.
    """

    def go() -> dict[str, Any]:
        from accelctl import config as config_mod
        from accelctl import plan
        from accelctl.devices import set_cpu_devices

        if cpu_devices is not None:
            set_cpu_devices(cpu_devices)
        if memory_limit is not None and not memory_limit >= 1:
            raise UserError("give a number of bytes >= 1", param="memory_limit", value=memory_limit)
        overrides = [*(set_ or [])]
        if batch_size is not None:
            overrides.append(f"train.batch_size={batch_size}")
        cfg = config_mod.load(config, overrides)
        return plan.plan(
            cfg,
            name=Path(config).stem,
            memory_limit=int(memory_limit) if memory_limit is not None else None,
            progress_fn=lambda line: print(f"plan: {line}", file=sys.stderr, flush=True),
        )

    result = run_guarded(go, debug=debug)
    if not write_json(result, json_out):
        print(render(result))


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def _flops(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e12:,.4g} TFLOP"


def render(r: dict[str, Any]) -> str:
    """The plan as text: plain lines (readable in logs and pipes), most important first."""
    mem, comp, roof = r["memory"], r["compute"], r["roofline"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    per_device = r["batch_size"] // r["mesh"]["data"]
    lines = [
        f"accelctl plan {r['config']}: compiled for the {r['backend']} backend, "
        f"{r['devices']} x {r['device_kind']} (mesh {mesh}), strategy {r['strategy']}",
    ]
    if "note" in r:
        lines.append(f"note: {r['note']}")
    lines += [
        f"batch {r['batch_size']} ({per_device} per data-parallel device), {r['precision']}, "
        f"remat {r['remat']}, accumulate_steps {r['accumulate_steps']}, "
        f"{r['num_params']:,} parameters",
        f"data: shapes from the {r['data']['shapes_from']}, example {r['data']['example_shape']}, "
        f"cache {r['data']['cache']} ({r['data']['cache_reason']})",
        "",
        "memory per device",
    ]
    rows = [
        ("parameters", mem["params_bytes"]),
        ("optimizer state", mem["opt_state_bytes"]),
        ("other train state", mem["other_state_bytes"]),
        ("inputs (one batch)", mem["input_bytes"]),
        ("compiled step: arguments", mem["argument_bytes"]),
        ("compiled step: outputs", mem["output_bytes"]),
        ("compiled step: aliased (donated)", mem["alias_bytes"]),
        ("compiled step: temporaries", mem["temp_bytes"]),
        ("compiled step: total", mem["total_bytes"]),
        ("data cache on the device", mem["data_cache_bytes"]),
        ("needed", mem["need_bytes"]),
    ]
    lines += [f"  {name:<34}{_bytes(value):>14}" for name, value in rows]
    if mem["limit_bytes"] is None:
        lines.append(
            f"  {'limit':<34}  no limit known (the {r['backend']} backend reports none; give "
            "--memory-limit BYTES)"
        )
    else:
        lines.append(f"  {'limit (' + mem['limit_from'] + ')':<34}{_bytes(mem['limit_bytes']):>14}")
    verdict = {True: "yes", False: "NO", None: "unknown (no limit)"}[r["fits"]]
    lines += [f"  {'fits':<34}  {verdict}", "", "compute per device and step"]
    lines.append(f"  {'FLOPs (XLA cost analysis)':<34}{_flops(comp['flops_per_device']):>18}")
    if comp["model_flops_per_device"] is not None:
        lines.append(
            f"  {'model FLOPs (analytic)':<34}{_flops(comp['model_flops_per_device']):>18}"
            f"   {comp['model_flops_formula']}"
        )
    lines.append(f"  {'bytes accessed (XLA)':<34}{_bytes(comp['bytes_accessed_per_device']):>18}")
    lines.append(f"  {'attention kernel':<34}{comp['attention_kernel'] or 'none':>18}")
    if roof["step_time_s"] is not None:
        lines.append(
            f"  {'roofline step time':<34}{roof['step_time_s'] * 1e3:>15.3f} ms   "
            f"{roof['bound']}-bound ({roof['note']})"
        )
    else:
        lines.append(f"  {'roofline step time':<34}  {roof['note']}")
    if r["fits"] is False:
        lines += ["", "remedies, each planned again (compiled):"]
        for t in r["remedies"]:
            outcome = "fits" if t["fits"] else "does not fit"
            need = _bytes(t["need_bytes"]) if t["need_bytes"] is not None else t.get("error")
            lines.append(f"  {' '.join(t['set']):<44} {need}: {outcome}")
        s = r["suggestion"]
        lines.append(
            f"suggestion: {' '.join(s['set'])} (needs {_bytes(s['need_bytes'])} per device)"
            if s
            else "suggestion: none of these fits; use more devices or a smaller model"
        )
    return "\n".join(lines)
