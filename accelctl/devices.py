"""Devices: discovery (in a child process, or in this one), the host CPU device count, memory
limits, and the peak FLOP/s and memory bandwidth tables per device kind. The `accelctl env`
report is in envreport.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """Return the host CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """Return one line naming the CPU, core count, jax version and the visible devices."""
    import jax

    devs = jax.devices()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores visible; jax {jax.__version__}, "
        f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})"
    )


def set_cpu_devices(n: int) -> None:
    """Split the host CPU into `n` XLA devices; must run before the first JAX computation.

    XLA:CPU runs each convolution on a single thread, so a conv net on a many-core host only
    uses all cores as several data-parallel CPU devices (docs/benchmarks/bench.md). Overrides
    `--xla_force_host_platform_device_count` in XLA_FLAGS. Other backends are unaffected.

    Raises:
        UserError: n < 1, or JAX's backends are already initialised in this process.
    """
    import jax

    from accelctl.errors import UserError

    if n < 1:
        raise UserError("give a count of at least 1", param="cpu_devices", value=n)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        raise UserError(
            "JAX's backends are already initialised in this process; set the CPU device count "
            "before any JAX computation (e.g. JAX_NUM_CPU_DEVICES)",
            param="cpu_devices",
            value=n,
        ) from None


# Dense peak FLOP/s per device (no structured sparsity), from the vendors' datasheets. "fp32"
# is the TF32 tensor-core rate on NVIDIA GPUs from Ampere on, because XLA's default matmul
# precision lets float32 matmuls use TF32 there; V100 has no TF32 (plain FP32). Matched in
# order, by substring of `device.device_kind`, case-insensitive. JAX's device_kind on NVIDIA GPUs
# is CUDA's device name, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100
# NVL", "NVIDIA H200" (SXM), "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
_HOPPER_SXM = {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("h100 nvl", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12}),
    ("h100", _HOPPER_SXM),  # SXM (HBM3)
    ("h200 nvl", {}),  # the PCIe H200 runs at a lower clock: no datasheet number recorded here
    ("gh200", _HOPPER_SXM),  # Grace Hopper: the SXM H100/H200 chip
    ("h200", _HOPPER_SXM),  # SXM: the H100 SXM's chip with HBM3e
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("l40s", {"bf16": 362.05e12, "fp16": 362.05e12, "fp32": 183e12}),
    ("l40", {}),  # L40 (not S): no number recorded here
    ("l4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("a10g", {}),  # AWS's A10G differs from the A10: no number recorded here
    ("a10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("tpu v4", {"bf16": 275e12}),
    ("tpu v5 lite", {"bf16": 197e12}),
    ("tpu v5e", {"bf16": 197e12}),
    ("tpu v5p", {"bf16": 459e12}),
    ("tpu v5", {"bf16": 459e12}),  # v5p reports itself as "TPU v5"
    ("tpu v6", {"bf16": 918e12}),
)


# Peak memory (HBM / GDDR) bandwidth per device in bytes/s, from the vendors' datasheets; None
# where the device_kind string does not tell variants with different numbers apart. Matched in
# order, by substring of `device.device_kind`, case-insensitive; a kind matching nothing is
# unknown too (every CPU).
MEMORY_BANDWIDTH: tuple[tuple[str, float | None], ...] = (
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("h100 80gb hbm3", 3.35e12),  # SXM5
    ("gh200", None),  # 96 GB HBM3 (4.0 TB/s) or 144 GB HBM3e (4.9 TB/s): not in the name
    ("h100", None),  # other H100 variants
    ("h200", 4.8e12),  # SXM and NVL alike
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100-sxm4-40gb", 1.555e12),
    ("a100-pcie-40gb", 1.555e12),
    ("a100", None),  # other A100 variants
    ("l40s", 864e9),
    ("l40", 864e9),
    ("l4", 300e9),
    ("a10g", None),  # AWS's A10G differs from the A10: no number recorded here
    ("a10", 600e9),
    ("v100s", 1134e9),
    ("v100", 900e9),  # SXM2 and PCIe, 16 and 32 GB
    ("tpu v4", 1.2e12),
    ("tpu v5 lite", 819e9),
    ("tpu v5e", 819e9),
    ("tpu v5p", 2.765e12),
    ("tpu v5", 2.765e12),  # v5p reports itself as "TPU v5"
    ("tpu v6", 1.64e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of `device_kind` in `dtype`, or None when unknown
    (every CPU: there is no honest single number for it)."""
    kind = device_kind.lower()
    for pattern, peaks in PEAK_FLOPS:
        if pattern in kind:
            return peaks.get(dtype)
    return None


def memory_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth of one device of `device_kind` in bytes/s, or None when unknown."""
    kind = device_kind.lower()
    for pattern, bandwidth in MEMORY_BANDWIDTH:
        if pattern in kind:
            return bandwidth
    return None


def memory_limit(device: object) -> int | None:
    """Bytes of memory a device offers to XLA (`memory_stats()["bytes_limit"]`), None on CPU."""
    try:
        stats = device.memory_stats()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def backends_initialised() -> bool:
    """Whether JAX's backends are already initialised in this process (flags set now would
    have no effect).

    A feature check through public API instead of jax's private bridge module: JAX refuses to
    change `jax_num_cpu_devices` once the backends exist (and accepts the unchanged value), so
    try another value and put the old one back.
    """
    import jax

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update("jax_num_cpu_devices", current + 1)
    except RuntimeError:
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def discover(timeout: float = 300) -> dict[str, Any]:
    """The `accelctl env --json` report of a child process: backends, device counts and kinds,
    found without initialising (or taking the memory of) any accelerator in this process.

    Raises:
        UserError: the child failed or timed out.
    """
    from accelctl.errors import UserError

    cmd = [sys.executable, "-m", "accelctl", "env", "--json", "-"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"could not list the devices: `accelctl env` took over {timeout:.0f} s"
        ) from None
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"could not list the devices: {lines[-1] if lines else out.returncode}")
    return json.loads(out.stdout)
