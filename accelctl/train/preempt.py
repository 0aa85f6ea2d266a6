"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, checkpoints, and exits.

Schedulers (SLURM, Kubernetes, cloud spot instances) send SIGTERM some seconds before they kill a
job; people press Ctrl-C. The first signal only sets a flag that the loop reads after every step.
A second SIGINT means "now": the process exits at once with code 130, leaving at most a
checkpoint that was being written (resume ignores it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _abort() -> None:
    print("\naborted (second interrupt): no checkpoint written", file=sys.stderr, flush=True)
    os._exit(130)


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into `requested` for the training loop.

    Installed only in the main thread (Python delivers signals there); elsewhere it is inert.

    Args:
        abort_fn: what a second SIGINT does (default: exit 130 immediately).
    """

    def __init__(self, abort_fn: Callable[[], None] = _abort) -> None:
        self.requested: str | None = None  # name of the first signal received
        self._abort_fn = abort_fn
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(
                f"\n{name}: finishing the current step, then writing a checkpoint "
                "(press Ctrl-C again to abort at once)",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT:
            self._abort_fn()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
