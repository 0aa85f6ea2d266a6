"""`accelctl compare-devices`: one workload on every device set this machine has.

Device sets: the CPU backend with 1 device and with N host devices (data parallel, and pmap),
and every accelerator backend with 1 device, all devices (dp) and pmap over all devices. Each
measurement is one `accelctl bench` process, so backends and device counts never leak between
runs and the parent never holds accelerator memory; discovery is an `accelctl env` process too.
A set that fails (out of memory, a batch that does not divide, a timeout) gets a row with the
reason instead of stopping the comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelctl import config as config_mod
from accelctl.config import Config
from accelctl.devices import discover

SCHEMA = "accelctl.compare/1"
ACCELERATORS = ("gpu", "tpu")


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {timeout:.0f} s"
    return out.returncode, out.stdout, out.stderr


def _child_env(platform: str) -> dict[str, str]:
    env = dict(os.environ)
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def device_sets(report: dict[str, Any], cpu_devices: int) -> list[dict[str, Any]]:
    """The (platform, devices, strategy) sets to measure, CPU first."""
    sets = [{"platform": "cpu", "devices": 1, "strategy": "dp"}]
    if cpu_devices > 1:
        sets += [
            {"platform": "cpu", "devices": cpu_devices, "strategy": "dp"},
            {"platform": "cpu", "devices": cpu_devices, "strategy": "pmap"},
        ]
    for name in ACCELERATORS:
        n = report["backends"].get(name, {}).get("devices", 0)
        if n:
            sets.append({"platform": name, "devices": 1, "strategy": "dp"})
        if n > 1:
            sets.append({"platform": name, "devices": n, "strategy": "dp"})
            sets.append({"platform": name, "devices": n, "strategy": "pmap"})
    return sets


def measure(
    cfg: Config,
    dset: dict[str, Any],
    *,
    steps: int,
    warmup: int,
    timeout: float,
    precision: str = "fp32",
) -> dict[str, Any]:
    """One `accelctl bench` process on one device set; its result row or {"error": reason}.

    Args:
        cfg: the workload's config.
        dset: {"platform": cpu|gpu|tpu|None (the default backend), "devices": N or None (all),
            "strategy", optional "model": the tp mesh's model-axis size}.
        steps, warmup, timeout, precision: for `accelctl bench`.
    """
    cfg = config_mod.replace(
        cfg,
        {
            "parallel": {
                "strategy": dset["strategy"],
                "num_devices": dset["devices"],
                "mesh": {"data": -1, "model": dset.get("model", 1)},
            }
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workload.yaml"
        path.write_text(cfg.to_yaml())  # the child `accelctl bench` reads it
        cmd = [sys.executable, "-m", "accelctl", "bench", str(path), "--json", "-"]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), "--precision", precision]
        if dset["platform"] == "cpu" and dset["devices"]:
            cmd += ["--cpu-devices", str(dset["devices"])]
        code, out, err = _run(cmd, _child_env(dset["platform"]), timeout)
    if code != 0:
        return {"error": _last_line(err) or f"exit code {code}"}
    return json.loads(out)["results"][0]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _row(dset: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        return {**dset, "device_kind": None, "error": r["error"]}
    return {
        **dset,
        "device_kind": r["device_kind"],
        "samples_per_s": r["samples_per_s"],
        "tokens_per_s": r.get("tokens_per_s"),
        "step_time_median_s": r["step_time_s"]["median"],
        "compile_s": r["compile_s"]["cold"],
        "mfu": r["mfu"],
        "memory_bytes_per_device": r["memory"]["total_bytes"],
        "error": None,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_cpu (over CPU with 1 device) and scaling_efficiency (throughput over N x the
    same platform's 1-device throughput), where the reference rows succeeded."""

    def one_device(platform: str) -> float | None:
        for r in rows:
            if r["platform"] == platform and r["devices"] == 1 and not r["error"]:
                return r["samples_per_s"]
        return None

    cpu = one_device("cpu")
    for r in rows:
        ok = not r["error"]
        single = one_device(r["platform"])
        r["speedup_vs_cpu"] = r["samples_per_s"] / cpu if ok and cpu else None
        r["scaling_efficiency"] = (
            r["samples_per_s"] / (r["devices"] * single) if ok and single else None
        )


def compare_devices(
    name: str,
    cfg: Config,
    *,
    cpu_devices: int,
    steps: int = 30,
    warmup: int = 5,
    timeout: float = 600,
    progress_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the workload on every device set (the `compare-devices` command).

    Args:
        name: the workload's name for the report.
        cfg: its config.
        cpu_devices: host devices for the multi-device CPU sets (1: CPU with 1 device only).
        steps, warmup: passed to each `accelctl bench`.
        timeout: seconds per measurement; a set that takes longer gets an error row.
        progress_fn: called with a line before each measurement.
    Returns:
        {"schema", "workload", "cpu", "accelerators", "note", "rows": [...]}; rows have
        platform, devices, strategy, device_kind, samples_per_s, tokens_per_s,
        step_time_median_s, compile_s, mfu, memory_bytes_per_device, speedup_vs_cpu,
        scaling_efficiency, and error (null, or the reason the set failed).
    """
    report = discover(timeout)  # in a child process: this one never takes GPU memory
    accelerators = {
        k: v for k, v in report["backends"].items() if k in ACCELERATORS and "devices" in v
    }
    rows = []
    for dset in device_sets(report, cpu_devices):
        if progress_fn:
            progress_fn(f"{name}: {dset['platform']} x {dset['devices']} ({dset['strategy']})")
        rows.append(_row(dset, measure(cfg, dset, steps=steps, warmup=warmup, timeout=timeout)))
    _add_ratios(rows)
    note = (
        None
        if accelerators
        else "no accelerator is visible: only the CPU backend was measured "
        f"(1 device and {cpu_devices} host devices); `accelctl env` says why"
    )
    return {
        "schema": SCHEMA,
        "workload": name,
        "cpu": report["cpu"],
        "accelerators": {
            k: {"devices": v["devices"], "kind": v["kind"]} for k, v in accelerators.items()
        },
        "note": note,
        "rows": rows,
    }


def plot_compare(result: dict[str, Any], path: Path) -> None:
    """Bar chart of samples/s per device set (failed sets drawn as empty, labelled bars)."""
    # A Figure on its own Agg canvas, like accelctl.plot: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    labels = [f"{r['platform']} x{r['devices']}\n{r['strategy']}" for r in rows]
    values = [r["samples_per_s"] if not r["error"] else 0.0 for r in rows]
    colours = {"cpu": "tab:blue", "gpu": "tab:green", "tpu": "tab:orange"}
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color=[colours.get(r["platform"], "tab:gray") for r in rows])
    for bar, r in zip(bars, rows, strict=True):
        text = "failed" if r["error"] else f"{r['samples_per_s']:,.0f}"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("training samples/s (higher is better)")
    ax.set_title(f"accelctl compare-devices: {result['workload']}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
