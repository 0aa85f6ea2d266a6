"""Host memory: what this process can still take (MemAvailable, capped by a container's cgroup
limit), byte counts for messages, and the checks that refuse data or an eval batch the host
cannot hold, before anything is allocated."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelctl.errors import FieldError

HOST_WAYS_OUT = (
    "a smaller train.batch_size or train.eval_batch_size; fewer batches kept ready "
    "(data.prefetch); less data in memory (fewer or smaller examples; data.cache: none streams "
    "a tfds data set from its files)"
)


_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_CGROUP_UNLIMITED = 1 << 60  # cgroup v1 spells "no limit" as a number near 2^63


# ------------------------------------------------------------------------------- sizes and text
def format_bytes(n: float) -> str:
    """`n` bytes in binary units, e.g. "1.5 GiB" (whole bytes below 1 KiB)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def show_bytes(n: int) -> str:
    """`n` bytes readable and exact, e.g. "1.5 GiB (1,610,612,736 bytes)"."""
    return f"{format_bytes(n)} ({int(n):,} bytes)" if n >= 1024 else f"{int(n)} bytes"


# --------------------------------------------------------------------------------- host memory
def host_available_bytes() -> int | None:
    """Host memory this process can still take now, or None when the OS does not say.

    The kernel's MemAvailable (free pages plus caches it can drop), capped by the room left
    under the process's cgroup memory limit (a container's), where the OOM killer acts first.
    """
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None without one.

    Usage counts the page cache; its inactive part is reclaimed before the OOM killer acts, so
    it is subtracted (as `docker stats` and the kubelet do).
    """
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        hierarchy, controllers, rel = (entry.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0":  # v2: one unified hierarchy
            root, names = Path("/sys/fs/cgroup"), ("memory.max", "memory.current")
            inactive = "inactive_file"
        elif "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            inactive = "total_inactive_file"
        else:
            continue
        # Inside a container the process's own path may not be mounted, or set no limit of its
        # own: the container's root then holds the limit.
        for folder in (root / rel.lstrip("/"), root):
            limit, usage = _read_int(folder / names[0]), _read_int(folder / names[1])
            if limit is None or usage is None:
                continue
            if limit >= _CGROUP_UNLIMITED:
                return None
            usage -= _stat_value(folder / "memory.stat", inactive)
            return max(limit - usage, 0)
    return None


def check_host_bytes(
    need: int, *, path: tuple[str | int, ...], what: str, fix_fn: Callable[[float], str]
) -> None:
    """Refuse to generate or read `need` bytes into host memory that is not there.

    Args:
        need: the bytes (the peak, with temporaries).
        path: the config field that sets the size, e.g. ("data", "num_train").
        what: the subject of the message, e.g. "1,000,000,000 examples of shape [28, 28, 1]".
        fix_fn: the fraction of `need` available -> how to lower it, e.g. "Lower
            data.num_train (about 20,000,000 fit)."
    Raises:
        FieldError: at `path`, with the bytes needed and available, before anything is
            allocated.
    """
    available = host_available_bytes()
    if available is None or need <= available:
        return
    raise FieldError(
        path,
        f"{what} need about {show_bytes(need)} of host memory, more than the "
        f"{show_bytes(available)} available now; nothing was allocated. "
        f"{fix_fn(available / need)}",
    )


def eval_row_bytes(ds: Any) -> tuple[int, int]:
    """(bytes of one example's input, of its label) on the host."""
    x = math.prod(ds.input_shape) * ds.train.x_dtype.itemsize
    y = 4 * (math.prod(ds.input_shape) if ds.tokens else 1)  # int32 labels / next tokens
    return x, y


def check_eval_batch(cfg: Any, ds: Any, batch: int, data_size: int, processes: int = 1) -> None:
    """Refuse an eval batch whose host arrays alone exceed the available host memory.

    `data.eval_batches` builds each process's part of a batch from index arrays (int64), the
    rows taken, the labels with padding zeroed and a float32 mask; that is a lower bound of
    what one batch takes (the prefetch thread keeps more ready), so what is refused cannot fit.

    Args:
        cfg: the config (which field to name).
        ds: the data set (example layout, eval split size).
        batch: the global eval batch.
        data_size: devices on the data axis (an eval batch is a multiple of it).
        processes: processes sharing the batch (each builds its part on its own host).
    Raises:
        FieldError: at train.eval_batch_size (train.batch_size when that is unset), with an
            eval batch that fits (one that holds the whole eval split where that is smaller).
    """
    x, y = eval_row_bytes(ds)
    per_row = 8 + 8 + 1 + x + 3 * y + 4
    available = host_available_bytes()
    if available is None or batch // processes * per_row <= available:
        return
    field = "eval_batch_size" if cfg.train.eval_batch_size else "batch_size"
    whole = -(-len(ds.eval) // data_size) * data_size
    fits = available * processes // per_row // data_size * data_size
    hint = (
        f"an eval batch of {whole:,} holds all {len(ds.eval):,} eval examples"
        if whole <= fits
        else f"at most about {fits:,} fit"
    )
    raise FieldError(
        ("train", field),
        f"an eval batch of {batch:,} examples needs at least "
        f"{show_bytes(batch // processes * per_row)} of "
        f"host memory ({format_bytes(per_row)} per example), more than the "
        f"{show_bytes(available)} available now; nothing was allocated. Lower "
        f"train.eval_batch_size: {hint} (a multiple of the {data_size} devices of the data axis).",
    )
