"""Device and machine discovery shared by benchmarks and reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
