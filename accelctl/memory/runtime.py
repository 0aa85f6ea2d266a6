"""Running out of memory at run time: XLA's RESOURCE_EXHAUSTED and numpy's MemoryError become
one `OutOfMemory` with the bytes read from XLA's message, what is available, and the ways out."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from accelctl.errors import AccelctlError, OutOfMemory, describe_output_failure
from accelctl.memory import host
from accelctl.memory.device import WAYS_OUT
from accelctl.memory.host import HOST_WAYS_OUT, format_bytes, show_bytes

_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_HUMAN = r"([\d.]+)\s*([KMGTP]?)(?:i?B)?"  # XLA's HumanReadableNumBytes: 8.00M, 32.00GiB


class XlaOom(NamedTuple):
    """What an XLA out-of-memory message says, in bytes (None where it does not say)."""

    need: int | None  # the allocation (or the program's total) that failed
    free: int | None  # what was free then
    capacity: int | None  # the memory space's size


def _human(value: str, unit: str) -> int:
    return int(float(value) * _SCALE[unit.upper()])


def parse_xla_oom(message: str) -> XlaOom:
    """The bytes an XLA out-of-memory message names.

    Handles the GPU/CPU allocators ("Out of memory while trying to allocate N bytes", "Out of
    memory allocating N bytes", "Failed to allocate request for 32.00MiB (33554432B)") and
    XLA:TPU's ("Attempting to allocate 8.00M. ... There are 6.43M free", "Used 49.34G of
    32.00G hbm", "Requires 3.84T, has 90.96G available", "Allocation (size=N) would exceed
    memory (size=M)").
    """
    m = re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", message)
    if m:
        return XlaOom(int(m.group(1)), None, int(m.group(2)))
    m = re.search(rf"Used {_HUMAN} of {_HUMAN} \w+", message)
    if m:
        return XlaOom(_human(m.group(1), m.group(2)), None, _human(m.group(3), m.group(4)))
    m = re.search(rf"Requires {_HUMAN}, has {_HUMAN} available", message)
    if m:
        return XlaOom(_human(m.group(1), m.group(2)), _human(m.group(3), m.group(4)), None)
    need: int | None = None
    m = re.search(r"allocat(?:e|ing) (\d+) bytes", message) or re.search(
        r"allocate request for [\d.]+\s*\w+ \((\d+)B\)", message
    )
    if m:
        need = int(m.group(1))
    else:
        m = re.search(rf"Attempting to (?:allocate|reserve) {_HUMAN}", message)
        if m:
            need = _human(m.group(1), m.group(2))
    m = re.search(rf"There are {_HUMAN} free", message)
    return XlaOom(need, _human(m.group(1), m.group(2)) if m else None, None)


def _is_xla_oom(exc: BaseException) -> bool:
    jax = sys.modules.get("jax")  # an XLA error needs jax loaded; never import it here
    if jax is None:
        return False
    runtime = getattr(getattr(jax, "errors", None), "JaxRuntimeError", None)
    xla = (runtime is not None and isinstance(exc, runtime)) or type(exc).__name__ in (
        "XlaRuntimeError",
        "JaxRuntimeError",
    )
    # Orbax/tensorstore report a full disk as RESOURCE_EXHAUSTED too: that is an output error.
    return xla and "RESOURCE_EXHAUSTED" in str(exc) and describe_output_failure(exc) is None


def _find_oom(exc: BaseException) -> BaseException | None:
    """The out-of-memory error `exc` is or wraps (numpy's MemoryError, XLA's
    RESOURCE_EXHAUSTED), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or _is_xla_oom(current):
            return current
        current = current.__cause__ or current.__context__
    return None


# Where a run-time failure happened, from the functions on its traceback (innermost wins).
_PHASES = {
    ("loop.py", "evaluate"): "during evaluation",
    ("state.py", "init"): "while initialising the train state",
    ("init_from.py", "initial_state"): "while initialising the train state",
    ("__init__.py", "_restore"): "while restoring the checkpoint",
    ("loop.py", "run"): "during training",
    ("job.py", "build_job"): "while preparing the job (data, compile)",
}


def _phase(exc: BaseException) -> str:
    phase = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        phase = _PHASES.get((Path(code.co_filename).name, code.co_name), phase)
        tb = tb.tb_next
    return phase


def _device_state() -> str:
    """What the first local device has and uses now (GPU/TPU), or the host's free memory."""
    import jax

    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        used = stats.get("peak_bytes_in_use")
        peak = f", {format_bytes(used)} of it in use at the peak so far" if used else ""
        return f"each {device.device_kind} offers {show_bytes(int(stats['bytes_limit']))}{peak}"
    free = host.host_available_bytes()
    return f"the host has {show_bytes(free)} available now" if free else "host memory is unknown"


def out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """The `OutOfMemory` to report for `exc` when it is (or wraps) running out of host or
    device memory, else None.

    The message names where it happened (evaluation, initialisation, training), the bytes that
    could not be allocated (parsed from XLA's message, or numpy's array size), what is
    available, and the ways out; XLA's allocation report (buffer listings) is left out.
    """
    found = _find_oom(exc)
    if found is None:
        return None
    phase = _phase(found) or _phase(exc)
    where = f" {phase}" if phase else ""
    if isinstance(found, MemoryError):
        size = getattr(found, "_total_size", None)  # numpy's _ArrayMemoryError
        shape = getattr(found, "shape", None)
        what = (
            f"numpy could not allocate {show_bytes(int(size))} for an array of shape {tuple(shape)}"
            if size is not None and shape is not None
            else f"an allocation failed ({found or 'MemoryError'})"
        )
        free = host.host_available_bytes()
        have = f"; {show_bytes(free)} is available now" if free is not None else ""
        return OutOfMemory(
            f"the host ran out of memory{where}: {what}{have}. Ways out: {HOST_WAYS_OUT}."
        )
    text = str(found)
    first = text.strip().splitlines()[0].strip().rstrip(".") if text.strip() else "?"
    said = parse_xla_oom(text)
    what = f"XLA could not allocate {show_bytes(said.need)}" if said.need else "XLA failed"
    if said.free is not None:
        what += f" ({show_bytes(said.free)} free)"
    elif said.capacity is not None:
        what += f" (of {show_bytes(said.capacity)})"
    ways = WAYS_OUT
    if phase == "during evaluation":
        ways = f"a smaller train.eval_batch_size; {WAYS_OUT}"
    return OutOfMemory(
        f"a device ran out of memory{where}: {what}; {_device_state()}. XLA said: "
        f"{first[:300]}. Ways out: {ways}."
    )


@contextlib.contextmanager
def stop_on_out_of_memory(after: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn running out of host or device memory inside the block into one `OutOfMemory`
    (exit 5; the original error stays its cause). Other errors pass unchanged.

    Args:
        after: called when it happens; its text (how to go on, e.g. from which checkpoint) is
            added to the message.
    """
    try:
        yield
    except AccelctlError:
        raise
    except Exception as e:
        error = out_of_memory(e)
        if error is None:
            raise
        if after is not None:
            error = OutOfMemory(f"{error.message} {after()}")
        raise error from e
