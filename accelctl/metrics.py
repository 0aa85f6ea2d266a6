"""Metric writers behind one protocol: Rich progress, JSON lines, TensorBoard, or nothing.

Rich is used only here and in `cli/`. Logs go to stderr; results go to stdout or `--json`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

Event = Mapping[str, Any]


class MetricWriter(Protocol):
    """Receives log/eval events from the training loop (on process 0 only)."""

    def start(self, total_steps: int, description: str) -> None: ...

    def write(self, event: Event) -> None: ...

    def progress(self, step: int) -> None:
        """Steps dispatched so far (the events follow one log interval late)."""

    def close(self) -> None: ...


class NullWriter:
    """Discards everything (other processes, `--quiet` without a run directory)."""

    def start(self, total_steps: int, description: str) -> None:
        pass

    def write(self, event: Event) -> None:
        pass

    def progress(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlWriter:
    """Appends one JSON object per event to `metrics.jsonl`, flushed at once."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", encoding="utf-8")

    def start(self, total_steps: int, description: str) -> None:
        pass

    def write(self, event: Event) -> None:
        self._file.write(json.dumps(dict(event), allow_nan=True) + "\n")
        self._file.flush()

    def progress(self, step: int) -> None:
        pass

    def close(self) -> None:
        self._file.close()


TENSORBOARD_DIR = "tensorboard"

# Event fields logged as TensorBoard scalars, per event kind ("train/loss", "eval/accuracy", ...).
_TB_SCALARS = {
    "train": (
        "loss",
        "accuracy",
        "lr",
        "grad_norm",
        "steps_per_s",
        "samples_per_s",
        "overflow",
        "skipped",
    ),
    "eval": ("loss", "accuracy"),
}


class TensorBoardWriter:
    """Logs train/eval events as TensorBoard scalars at `global_step=event["step"]` (tensorboardX,
    no TensorFlow needed); other events and NaN values are left out.

    Each event is flushed at once, as in `metrics.jsonl`, so a killed run loses none of them. A
    resumed run passes `purge_step`: TensorBoard then hides the steps from there on that the
    interrupted run logged in its older event files, and shows the resumed run's values instead.

    Args:
        log_dir: folder of the event files (created if missing).
        purge_step: first step the resumed run logs again; None for a fresh run.
    """

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        # Event file names carry the time in whole seconds only. The step the file starts from
        # keeps a run resumed within the same second from overwriting the previous file, and
        # TensorBoard (which reads the files in name order) reading them out of order.
        self._writer: Any = SummaryWriter(
            str(log_dir), purge_step=purge_step, filename_suffix=f".{purge_step or 0:010d}"
        )
        self._closed = False

    def start(self, total_steps: int, description: str) -> None:
        pass

    def write(self, event: Event) -> None:
        kind = event.get("event")
        if kind not in _TB_SCALARS:
            return
        for key in _TB_SCALARS[kind]:
            value = event.get(key)
            if value is None or math.isnan(value):
                continue
            self._writer.add_scalar(f"{kind}/{key}", float(value), global_step=int(event["step"]))
        self._writer.flush()

    def progress(self, step: int) -> None:
        pass

    def close(self) -> None:
        if not self._closed:  # the loop and `train()` both close the writers
            self._closed = True
            try:
                self._writer.close()
            except OSError:
                self._abandon()
                raise

    def _abandon(self) -> None:
        """After a failed close (disk full): stop tensorboardX's writer threads and mark its
        files closed, so its exit handler does not fail on the same disk again."""
        for fw in getattr(self._writer, "all_writers", {}).values():
            ew = getattr(fw, "event_writer", None)
            worker = getattr(ew, "_worker", None)
            if worker is not None:
                try:
                    worker.stop()
                except Exception:  # noqa: BLE001, S110 - best effort while already failing
                    pass
            if ew is not None:
                ew._closed = True


def _fmt(value: Any, spec: str = ".4f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class ProgressWriter:
    """Rich progress bar on a terminal; plain, control-code-free lines otherwise.

    Shows steps, steps/s, samples/s, the latest train loss and the ETA; eval results are printed
    as lines above the bar.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console

        self._console = Console(file=stream or sys.stderr, highlight=False)
        self._progress: Any = None
        self._task: Any = None
        self._total = 0
        self._description = ""
        self._dispatched = 0

    def start(self, total_steps: int, description: str) -> None:
        self._total, self._description = total_steps, description
        if not self._console.is_terminal:
            self._console.print(f"{description}: {total_steps} steps", soft_wrap=True)
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[steps_per_s]} steps/s"),
            TextColumn("{task.fields[samples_per_s]} samples/s"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("acc {task.fields[accuracy]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            description,
            total=total_steps,
            steps_per_s="-",
            samples_per_s="-",
            loss="-",
            accuracy="-",
        )

    def write(self, event: Event) -> None:
        if event.get("event") == "eval":
            line = (
                f"eval  step {event['step']}: loss {_fmt(event.get('loss'))}  "
                f"accuracy {_fmt(event.get('accuracy'))}"
            )
            self._console.print(line, soft_wrap=True)
            return
        if event.get("event") != "train":
            return
        rate = event.get("steps_per_s")
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=max(self._dispatched, event["step"]),
                steps_per_s=_fmt(rate, ".1f"),
                samples_per_s=_fmt(event.get("samples_per_s"), ".0f"),
                loss=_fmt(event.get("loss")),
                accuracy=_fmt(event.get("accuracy")),
            )
            return
        remaining = (self._total - event["step"]) / rate if rate else None
        self._console.print(
            f"train step {event['step']}/{self._total}: loss {_fmt(event.get('loss'))}  "
            f"acc {_fmt(event.get('accuracy'))}  {_fmt(rate, '.1f')} steps/s  "
            f"{_fmt(event.get('samples_per_s'), '.0f')} samples/s  ETA {_eta(remaining)}",
            soft_wrap=True,
        )

    def progress(self, step: int) -> None:
        self._dispatched = step
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class MultiWriter:
    """Fans every call out to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]) -> None:
        self._writers = list(writers)

    def start(self, total_steps: int, description: str) -> None:
        for w in self._writers:
            w.start(total_steps, description)

    def write(self, event: Event) -> None:
        for w in self._writers:
            w.write(event)

    def progress(self, step: int) -> None:
        for w in self._writers:
            w.progress(step)

    def close(self) -> None:
        for w in self._writers:
            w.close()
