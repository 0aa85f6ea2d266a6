"""Profiling: a `jax.profiler` trace of chosen steps, and its most expensive device operations.

`accelctl train --profile START:COUNT` traces steps START..START+COUNT-1 (the loop's profile
hook, `train.hooks.ProfileHook`); `accelctl bench --profile DIR` traces a repeat of each
workload's bare-step window. jax writes the trace under `<dir>/plugins/profile/<timestamp>/`:
`<host>.xplane.pb` (TensorBoard's profile plugin / XProf: `tensorboard --logdir <dir>`) and
`<host>.trace.json.gz` (Chrome-trace JSON, which Perfetto opens). `parse_trace` reads the JSON
and sums the time of each device operation.

How a trace marks device operations (read off real traces, not guessed):
- XLA:CPU (jax 0.10): there is no device process; the thunk executor records one event per HLO
  op on the host process's worker threads ("tf_XLAPjRtCpuClient/...", "tf_XLAEigen/...") with
  args {"hlo_op", "hlo_module", "device_ordinal"}, each followed by a short "end: <op>" marker
  that has no `hlo_op`. Events with an `hlo_op` argument are the ops.
- GPU/TPU: processes named "/device:GPU:N" / "/device:TPU:N". A device line named "XLA Ops" (TPU,
  and derived timelines) holds one event per op; otherwise the "Stream #..." lines hold the
  kernels and copies CUPTI recorded, keyed by their `hlo_op` argument where XLA annotated the
  launch, else by the kernel's name. Host events are then ignored (they are launches, not
  device work).
Ops nested in another op on the same line (a while loop's body inside its thunk) count their
own time once: each op is charged its self time.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelctl.errors import UserError

TOP_OPS = 10
TRACE_GLOB = "plugins/profile/*/*.trace.json.gz"
DEVICE_PREFIX = "/device:"
XLA_OPS_LINE = "XLA Ops"


@dataclass(frozen=True)
class Window:
    """Steps `start` to `start + count - 1` (1-based: step k is the k-th update)."""

    start: int
    count: int

    @property
    def last(self) -> int:
        return self.start + self.count - 1

    def __str__(self) -> str:
        return f"{self.start}:{self.count}"


def parse_window(text: str) -> Window:
    """Read "START:COUNT" (two whole numbers, START >= 1, COUNT >= 1).

    Raises:
        ValueError: with a message saying what is wrong (the caller names the option).
    """
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError("give START:COUNT, e.g. 10:5 (steps 10 to 14)")
    try:
        start, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError("START and COUNT must be whole numbers, e.g. 10:5") from None
    if start < 1:
        raise ValueError("START must be at least 1 (the first step is step 1)")
    if count < 1:
        raise ValueError("COUNT must be at least 1")
    return Window(start, count)


def check_window(window: Window, *, first_step: int, total: int) -> None:
    """Raise UserError (param "profile") unless the window lies inside the steps this run trains.

    Args:
        window: the steps to trace.
        first_step: the updates already done (0, or the step a resumed run continues from).
        total: the run's last step.
    """
    if window.last > total:
        raise UserError(
            f"steps {window.start} to {window.last} reach past the {total} steps this run "
            f"trains; choose a window inside 1..{total}",
            param="profile",
            value=str(window),
        )
    if window.start <= first_step:
        raise UserError(
            f"the run continues from step {first_step}, after the window's start; choose a "
            f"START above {first_step}",
            param="profile",
            value=str(window),
        )


# ---------------------------------------------------------------------------- capturing traces
def start_trace(log_dir: Path) -> None:
    """Start a jax.profiler trace into `log_dir` (host and device activity, no Python frames:
    Python tracing slows the host loop and its input thread far more than it reveals here)."""
    import jax

    log_dir.mkdir(parents=True, exist_ok=True)
    options = None
    if hasattr(jax.profiler, "ProfileOptions"):
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
    try:
        jax.profiler.start_trace(str(log_dir), profiler_options=options)
    except RuntimeError as e:  # another trace is running in this process
        raise UserError(f"cannot start a profiler trace: {e}", param="profile") from None


def stop_trace() -> None:
    """Stop the trace and write its files (the caller waits for the device first)."""
    import jax

    jax.profiler.stop_trace()


def stop_if_running() -> bool:
    """Stop a trace that is still running (a run that failed inside its window); True if one
    was."""
    import jax

    try:
        jax.profiler.stop_trace()
    except RuntimeError:  # "No profile started"
        return False
    return True


@dataclass(frozen=True)
class Request:
    """A profile asked of a training run (`train(..., profile=...)`): its window, where the
    trace goes, and how many ops the summary lists."""

    window: Window
    log_dir: Path
    top: int = TOP_OPS


# ---------------------------------------------------------------------------- reading traces
@dataclass(frozen=True)
class OpTable:
    """Device time per operation in one trace.

    Attributes:
        rows: [{"name", "total_ms", "share", "count"}], most expensive first; total_ms is summed
            over every device (self time: nested ops are not counted twice); share of the total.
        total_ms: device time of all ops together (all devices).
        devices: devices the ops ran on.
        source: which events were read: "xla-ops" (device "XLA Ops" lines), "streams" (device
            stream lines) or "cpu-thunks" (XLA:CPU op events on host threads).
    """

    rows: list[dict[str, Any]]
    total_ms: float
    devices: int
    source: str


def find_trace(log_dir: Path | str) -> Path:
    """The newest `*.trace.json.gz` jax wrote under `log_dir`.

    Raises:
        FileNotFoundError: none there.
    """
    found = sorted(Path(log_dir).glob(TRACE_GLOB), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {TRACE_GLOB} under {log_dir}")
    return found[-1]


def _load(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path} as a Chrome-trace JSON file ({e})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise UserError(f"{path} holds no traceEvents list: not a Chrome-trace JSON file")
    return [e for e in events if isinstance(e, dict)]


def _names(events: list[dict[str, Any]]) -> tuple[dict[Any, str], dict[tuple[Any, Any], str]]:
    """Process and thread names from the metadata events."""
    procs: dict[Any, str] = {}
    threads: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = str((e.get("args") or {}).get("name", ""))
        if e.get("name") == "process_name":
            procs[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = name
    return procs, threads


def _op_events(events: list[dict[str, Any]]) -> tuple[list[tuple[dict, str]], str]:
    """The events that are device operations, each with the name it is summed under."""
    procs, threads = _names(events)
    spans = [e for e in events if e.get("ph") == "X" and isinstance(e.get("dur"), int | float)]
    devices = {pid for pid, name in procs.items() if name.startswith(DEVICE_PREFIX)}

    def key(e: dict[str, Any]) -> str:
        return str((e.get("args") or {}).get("hlo_op") or e.get("name", "?"))

    if devices:
        by_line: dict[tuple[Any, Any], list[dict]] = {}
        for e in spans:
            if e.get("pid") in devices:
                by_line.setdefault((e.get("pid"), e.get("tid")), []).append(e)
        picked: list[tuple[dict, str]] = []
        sources = set()
        for pid in devices:
            lines = {line: evs for line, evs in by_line.items() if line[0] == pid}
            xla_ops = [ln for ln in lines if threads.get(ln) == XLA_OPS_LINE]
            streams = [ln for ln in lines if threads.get(ln, "").startswith("Stream")]
            if xla_ops:
                sources.add("xla-ops")
                picked += [(e, str(e.get("name", "?"))) for ln in xla_ops for e in lines[ln]]
            elif streams:
                sources.add("streams")
                picked += [(e, key(e)) for ln in streams for e in lines[ln]]
        if picked:
            return picked, "+".join(sorted(sources))
    ops = [(e, key(e)) for e in spans if (e.get("args") or {}).get("hlo_op")]
    return ops, "cpu-thunks"


def _self_times(picked: list[tuple[dict, str]]) -> list[tuple[dict, str, float]]:
    """Each event's duration less that of the events nested in it on the same line."""
    by_line: dict[tuple[Any, Any], list[tuple[dict, str]]] = {}
    for e, name in picked:
        by_line.setdefault((e.get("pid"), e.get("tid")), []).append((e, name))
    out = []
    for line in by_line.values():
        line.sort(key=lambda item: (float(item[0].get("ts", 0.0)), -float(item[0]["dur"])))
        own = [float(e["dur"]) for e, _ in line]
        stack: list[int] = []  # indices of the open (enclosing) events
        for i, (e, _) in enumerate(line):
            ts = float(e.get("ts", 0.0))
            while stack and ts >= _end(line[stack[-1]][0]):
                stack.pop()
            if stack:
                own[stack[-1]] -= float(e["dur"])
            stack.append(i)
        out += [(e, name, max(t, 0.0)) for (e, name), t in zip(line, own, strict=True)]
    return out


def _end(e: dict[str, Any]) -> float:
    return float(e.get("ts", 0.0)) + float(e["dur"])


def parse_trace(path: Path | str) -> OpTable:
    """Device time per operation of a jax Chrome-trace file (see the module docstring).

    Args:
        path: a `*.trace.json.gz` (or plain `.json`) file.
    Returns:
        The OpTable, every op, most expensive first.
    Raises:
        UserError: not readable as a Chrome-trace JSON file.
    """
    path = Path(path)
    picked, source = _op_events(_load(path))
    totals: dict[str, list[float]] = {}
    device_ids = set()
    for e, name, own in _self_times(picked):
        t = totals.setdefault(name, [0.0, 0])
        t[0] += own
        t[1] += 1
        args = e.get("args") or {}
        device_ids.add((e.get("pid"), args.get("device_ordinal", args.get("device_id"))))
    total_us = sum(t[0] for t in totals.values())
    rows = [
        {
            "name": name,
            "total_ms": us / 1e3,
            "share": us / total_us if total_us > 0 else 0.0,
            "count": int(n),
        }
        for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])
    ]
    return OpTable(rows, total_us / 1e3, len(device_ids), source)


def summarize(
    log_dir: Path | str,
    *,
    steps: tuple[int, int],
    wall_s: float,
    input_wait_s: float | None,
    top: int = TOP_OPS,
) -> dict[str, Any]:
    """The `profile` field of a summary (or of a bench row) for a trace just written.

    Args:
        log_dir: the folder given to the profiler.
        steps: first and last step traced.
        wall_s: host wall time of the traced steps (device work included).
        input_wait_s: seconds the host waited for input batches over those steps (None: no
            input pipeline, e.g. bench's bare step).
        top: operations listed.
    Returns:
        {"dir", "trace", "steps": [first, last], "wall_s", "input_wait_fraction", "top_ops":
        [{"name", "total_ms", "share", "count"}], "device_ms", "devices", "source", "error"}; a
        trace that cannot be found or read gives empty top_ops and the reason in "error".
    """
    out: dict[str, Any] = {
        "dir": str(log_dir),
        "trace": None,
        "steps": [steps[0], steps[1]],
        "wall_s": wall_s,
        "input_wait_fraction": (input_wait_s / wall_s if wall_s > 0 else 0.0)
        if input_wait_s is not None
        else None,
        "top_ops": [],
        "device_ms": None,
        "devices": None,
        "source": None,
        "error": None,
    }
    try:
        path = find_trace(log_dir)
        table = parse_trace(path)
    except (FileNotFoundError, UserError) as e:
        out["error"] = str(e)
        return out
    out.update(
        trace=str(path),
        top_ops=table.rows[:top],
        device_ms=table.total_ms,
        devices=table.devices,
        source=table.source,
    )
    if not table.rows:
        out["error"] = f"the trace {path} holds no device operations"
    return out
