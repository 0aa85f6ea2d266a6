"""The largest batch that fits: `bench --find-max-batch`, with `accelctl plan`'s machinery (the
train step compiled for abstract inputs, its memory analysis read; nothing allocated)."""

from __future__ import annotations

from typing import Any

from accelctl.config import Config
from accelctl.errors import UserError
from accelctl.plan import build_abstract_job, compile_train_step, compiled_memory


def _secant_guess(probes: list[dict[str, Any]], limit: int, unit: int) -> int | None:
    """The largest batch (a multiple of `unit`) that the line through the last two probes
    predicts to fit `limit`, or None when they give no increasing line."""
    a, b = sorted(probes[-2:], key=lambda p: p["batch_size"])
    if b["batch_size"] == a["batch_size"] or b["bytes"] <= a["bytes"]:
        return None
    slope = (b["bytes"] - a["bytes"]) / (b["batch_size"] - a["batch_size"])
    batch = b["batch_size"] + (limit - b["bytes"]) / slope
    return int(batch // unit * unit) if batch > 0 else None


def find_max_batch(
    cfg: Config, *, memory_limit: int | None = None, max_batch: int = 1 << 20
) -> dict[str, Any]:
    """The largest global batch whose train step fits each device's memory.

    Every probe compiles the step ahead of time for abstract inputs and reads the compiled
    memory analysis: nothing is allocated and no out-of-memory error is provoked. Batches are
    multiples of the data-axis size times the accumulation steps; after two probes each next
    one is the batch the line through the last two predicts to just fit (memory grows nearly
    linearly with the batch), with doubling or bisection where that line is no help, until the
    largest fitting batch is pinned to one unit. The step is host-fed (a device-cached split
    would add its size at every batch).

    Args:
        cfg: the workload (its batch size is ignored: the search starts at one unit).
        memory_limit: bytes per device; default: the device's own limit (GPU/TPU).
        max_batch: stop doubling here.
    Returns:
        {"max_batch_size", "bytes_per_device", "memory_limit_bytes", "data_axis", "probes":
        [{batch_size, bytes, fits}]}.
    Raises:
        UserError: no limit known (CPU) and none given; not even the smallest batch fits.
    """
    from accelctl.devices import memory_limit as device_limit

    job, _ = build_abstract_job(cfg)
    axis = job.mesh.shape["data"]
    unit = axis * cfg.optimizer.accumulate_steps
    limit = memory_limit if memory_limit is not None else device_limit(job.mesh.devices.flat[0])
    if limit is None:
        raise UserError(
            "this device reports no memory limit (the CPU backend never does); give one with "
            "{memory_limit} BYTES (e.g. 8e9)",
            param="find_max_batch",
            value="",
        )
    probes: list[dict[str, Any]] = []

    def probe(batch: int) -> bool:
        need = int(compiled_memory(compile_train_step(job, batch), None)["total_bytes"] or 0)
        probes.append({"batch_size": batch, "bytes": need, "fits": need <= limit})
        return need <= limit

    lo, hi = 0, None  # lo fits (0 = none yet), hi does not
    if not probe(unit):
        raise UserError(
            f"even a batch of {unit} needs {probes[0]['bytes']:,} bytes per device, more than "
            f"the {limit:,} available",
            param="find_max_batch",
            value="",
        )
    lo = unit
    # A step's memory grows (nearly) linearly with its batch: after two probes, jump to the
    # batch the line through the last two predicts to just fit (a secant step), and fall back
    # to doubling / halving where the line says nothing useful. A handful of compiles instead
    # of a doubling-then-bisection of dozens.
    while hi is None or hi - lo > unit:
        guess = _secant_guess(probes, limit, unit) if len(probes) >= 2 else None
        upper = hi - unit if hi is not None else max_batch // unit * unit
        if guess is None or not lo < guess <= upper:
            guess = min(lo * 2, upper) if hi is None else (lo + hi) // 2 // unit * unit
        if guess <= lo:
            break
        if probe(guess):
            lo = guess
            if hi is None and lo >= max_batch // unit * unit:
                break
        else:
            hi = guess
    best = next(p for p in probes if p["batch_size"] == lo)
    return {
        "max_batch_size": lo,
        "bytes_per_device": best["bytes"],
        "memory_limit_bytes": limit,
        "data_axis": axis,
        "probes": probes,
    }
