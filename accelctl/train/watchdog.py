"""The hang watchdog: a run that makes no progress for `train.hang_timeout` seconds dumps every
thread's stack and exits with code 124, so a scheduler can restart it from its last checkpoint.

A stuck collective, a dead peer or a data source that never returns blocks the main thread
inside C code, where no Python exception can reach it; a daemon thread watches the loop's
heartbeat instead and ends the process with `os._exit` after writing the stacks
(`faulthandler`) to stderr and to the run directory.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from accelctl.errors import Hung

AUTO_MIN_S = 300.0  # `auto` never waits less than five minutes...
AUTO_STEPS = 10  # ...or less than ten median steps


class Watchdog:
    """Context manager: `beat()` after each unit of progress; `pause()` around phases allowed to
    take long (a checkpoint write) without counting as a hang.

    Args:
        timeout: seconds, "auto" (max(AUTO_STEPS x median beat interval, AUTO_MIN_S)) or "off".
        run_dir: where the stack dump is written (None: stderr only).
        poll_s: how often the watchdog thread looks.
    """

    def __init__(self, timeout: float | str, run_dir: Path | None, *, poll_s: float = 1.0):
        self.timeout, self.run_dir, self.poll_s = timeout, run_dir, poll_s
        self._last = time.monotonic()
        self._intervals: deque[float] = deque(maxlen=50)
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def limit_s(self) -> float:
        """The current hang limit in seconds."""
        if isinstance(self.timeout, int | float):
            return float(self.timeout)
        median = statistics.median(self._intervals) if self._intervals else 0.0
        return max(AUTO_STEPS * median, AUTO_MIN_S)

    def beat(self) -> None:
        now = time.monotonic()
        self._intervals.append(now - self._last)
        self._last = now

    def pause(self) -> _Pause:
        return _Pause(self)

    def __enter__(self) -> Watchdog:
        if self.timeout != "off":
            self._last = time.monotonic()
            self._thread = threading.Thread(
                target=self._watch, name="accelctl-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self._paused:
                continue
            idle = time.monotonic() - self._last
            limit = self.limit_s()
            if idle > limit:
                self._fire(idle, limit)

    def _fire(self, idle: float, limit: float) -> None:
        where = self._dump()
        message = Hung(
            f"no training progress for {idle:.0f} s (train.hang_timeout: {self.timeout}, limit "
            f"{limit:.0f} s): the run looks hung (a stuck collective, a dead process, a data "
            f"source that never returns). Every thread's stack is above"
            + (f" and in {where}" if where else "")
            + ". Continue from the last checkpoint with {resume}."
        )
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(Hung.exit_code)

    def _dump(self) -> Path | None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.run_dir is None:
            return None
        path = self.run_dir / f"hang-{dt.datetime.now():%Y%m%d-%H%M%S}.txt"
        try:
            with path.open("w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            return None
        return path


class _Pause:
    def __init__(self, dog: Watchdog) -> None:
        self._dog = dog

    def __enter__(self) -> None:
        self._dog._paused += 1

    def __exit__(self, *exc: object) -> None:
        self._dog._paused -= 1
        self._dog._last = time.monotonic()  # the paused phase is not idle time
