"""The errors accelctl reports without a traceback, each with the exit code the CLI uses for it.

Two families, kept apart because they mean different things to a user and to a scheduler:
- `UserError` (exit 2): bad input — a config, a flag, a data file, a checkpoint, an output path.
  Nothing was trained; fix the input and run again.
- `RunStopped`: the input was fine but the run ended early — a non-finite loss (3), preemption
  (75, resume it), and the other stops documented in the README.

The library never names a command-line flag. An error about a parameter carries its name
(`param="run_dir"`) and value; messages refer to other parameters as `{resume}`-style
placeholders. `str(error)` spells them as Python parameters (`run_dir=...`, `resume`), and the CLI
renders the same error with its flag names (`--run-dir ...`, `--resume`) via `render()`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
# The parameters messages may refer to as `{name}` (the CLI spells each as a flag). Other text in
# braces (e.g. a user's config value quoted in a message) is left as it is.
PARAMS = frozenset(
    {
        "baseline",
        "batch_size",
        "checkpoint",
        "coordinator",
        "cpu_devices",
        "data_dir",
        "devices_per_process",
        "dist_timeout",
        "dtype",
        "find_max_batch",
        "format",
        "input",
        "json_out",
        "max_new_tokens",
        "memory_limit",
        "num_processes",
        "out",
        "output",
        "overrides",
        "platform",
        "plot",
        "precision",
        "process_id",
        "profile",
        "prompt",
        "resume",
        "run_dir",
        "seed",
        "step",
        "steps",
        "temperature",
        "tolerance",
        "top_k",
        "warmup",
    }
)


_display_names: dict[str, str] = {}


def set_display_names(names: dict[str, str]) -> None:
    """How `str(error)` spells parameters from now on (the CLI sets its flag names, so a message
    printed outside its error handler, e.g. by the hang watchdog's thread, names flags too)."""
    _display_names.clear()
    _display_names.update(names)


class AccelctlError(Exception):
    """Base of every error reported as a message (no traceback) with `exit_code`.

    Args:
        message: what is wrong, where and how to fix it; `{param}` placeholders name other
            parameters (rendered as flags by the CLI).
        param: the parameter whose value is wrong (e.g. "run_dir"), or None.
        value: that value (a path, a number), shown after the parameter's name (None or "":
            the parameter is a switch, only its name is shown).
    """

    exit_code = 1

    def __init__(self, message: str, *, param: str | None = None, value: Any = None) -> None:
        self.message, self.param, self.value = message, param, value
        super().__init__(message)

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with parameter names spelled by `names` (e.g. {"run_dir": "--run-dir"});
        parameters missing from `names` are spelled as in Python."""

        names = _display_names if names is None else names

        def name(param: str) -> str:
            return names.get(param, param)

        def sub(m: re.Match[str]) -> str:
            return name(m.group(1)) if m.group(1) in PARAMS else m.group(0)

        text = _PLACEHOLDER.sub(sub, self.message)
        if self.param is None:
            return text
        flag = name(self.param)
        if self.value is None or self.value == "":
            shown = flag
        else:
            shown = f"{flag} {self.value}" if flag.startswith("-") else f"{flag}={self.value}"
        return f"{shown}: {text}"

    def __str__(self) -> str:
        return self.render()


class UserError(AccelctlError):
    """Bad input: the message says what is wrong, where (file, line, field) and how to fix it."""

    exit_code = 2


class FieldError(UserError):
    """Bad input tied to one config field, e.g. ("data", "name").

    Raised below the config layer (which has no file positions there); the job builder turns it
    into a `ConfigError` located at that field's file:line:col.
    """

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        self.path = tuple(path)
        super().__init__(message)

    def render(self, names: Mapping[str, str] | None = None) -> str:
        dotted = ".".join(str(p) for p in self.path)
        return f"{dotted}: {super().render(names)}"


class RunStopped(AccelctlError):
    """The run ended before its last step for a reason other than bad input."""


class NonFiniteLoss(RunStopped):
    """Training stopped (`train.on_nan: stop`): a step's loss or gradients were not finite."""

    exit_code = 3


class Preempted(RunStopped):
    """SIGTERM/SIGINT: the run wrote a checkpoint and stopped; resuming continues it.

    Exit code 75 is EX_TEMPFAIL of sysexits.h: a temporary failure, retrying is expected.

    Attributes:
        run_dir: the run directory to resume.
        step: updates done.
        checkpoint: the checkpoint written, or None (checkpoints disabled).
    """

    exit_code = 75

    def __init__(self, message: str, *, run_dir: Any, step: int, checkpoint: Any) -> None:
        super().__init__(message)
        self.run_dir, self.step, self.checkpoint = run_dir, step, checkpoint


class OutputError(RunStopped):
    """A file could not be written (disk full, a read-only or vanished folder, no permission):
    the run stopped cleanly. Free space or fix the folder, then resume (exit 74, EX_IOERR)."""

    exit_code = 74


class OutOfMemory(RunStopped):
    """The step (or the data) needs more memory than the device or host has; the message gives
    the bytes needed and available and the ways out (exit 5)."""

    exit_code = 5


class Hung(RunStopped):
    """No step finished within `train.hang_timeout`: every thread's stack was dumped and the
    run stopped so a scheduler can restart it (exit 124, as `timeout(1)` reports)."""

    exit_code = 124


# OS errors that mean "this output cannot be written here", not a bug.
OUTPUT_ERRNOS = frozenset(
    {
        "ENOSPC",
        "EROFS",
        "EACCES",
        "EPERM",
        "EDQUOT",
        "EIO",
        "ENOENT",
        "ENOTDIR",
        "EISDIR",
        "ENAMETOOLONG",
        "EFBIG",
    }
)


def describe_output_failure(exc: BaseException) -> str | None:
    """The OS's reason when `exc` (or one it wraps, e.g. orbax/tensorstore's RESOURCE_EXHAUSTED
    with `os_error_code`) is a failure to write a file, else None."""
    import errno
    import os
    import re

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, "")
            if name in OUTPUT_ERRNOS:
                where = f" ({exc.filename})" if exc.filename else ""
                return f"{os.strerror(exc.errno)}{where}"
        match = re.search(r"os_error_code='(\d+)'", str(exc))
        if match and errno.errorcode.get(int(match.group(1)), "") in OUTPUT_ERRNOS:
            file = re.search(r'local file "([^"]+)"', str(exc))
            where = f" ({file.group(1)})" if file else ""
            return f"{os.strerror(int(match.group(1)))}{where}"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None
