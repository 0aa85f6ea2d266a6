"""Where results go: output paths checked before any work starts, and files written whole.

A command that trains for an hour and then cannot write its `--json` has lost the user's time;
so every output path is checked up front (its folder exists and is writable, it is not a folder,
a device or a file of /proc or /sys), and results are written through a temporary file renamed
into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from accelctl.errors import OutputError, UserError

# Pseudo file systems: their files look writable but take no results.
_PSEUDO = ("/proc/", "/sys/", "/dev/")


def check_output_file(path: Path, *, param: str) -> None:
    """Raise UserError (exit 2) unless a result can be written to the file `path`.

    Args:
        path: the output file (it may exist; it is replaced).
        param: the parameter it came in through, e.g. "json_out" (the CLI names its flag).
    """

    def fail(why: str) -> UserError:
        return UserError(why, param=param, value=path)

    text = str(path)
    if not text or "\0" in text:
        raise fail("is not a usable path")
    resolved = os.path.realpath(text)
    if resolved.startswith(_PSEUDO) or resolved in ("/proc", "/sys", "/dev"):
        raise fail(
            "is on a pseudo file system (/proc, /sys, /dev) that takes no results; write to a "
            "file (or use '-' for stdout where the option allows it)"
        )
    try:
        st = os.stat(text)
    except FileNotFoundError:
        _check_folder(path.parent, fail)
        return
    except OSError as e:
        raise fail(f"cannot be used: {os.strerror(e.errno or 0) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail("is a folder; name a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise fail("is not a regular file (a device, a pipe or a socket); name a file")
    if not os.access(text, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        raise fail("cannot be written (no permission, or a read-only file system)")


def _check_folder(folder: Path, fail: Callable[[str], UserError]) -> None:
    folder = folder if str(folder) else Path(".")
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise fail(f"its folder {folder} does not exist; create it first") from None
    except OSError as e:
        raise fail(f"its folder {folder} cannot be used: {os.strerror(e.errno or 0)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise fail(f"{folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise fail(f"its folder {folder} is not writable (permissions or a read-only file system)")


def check_output_dir(path: Path, *, param: str) -> None:
    """Raise UserError unless the folder `path` exists and is writable, or can be created (its
    nearest existing ancestor is a writable folder), and its path is one the OS accepts."""

    def fail(why: str) -> UserError:
        return UserError(why, param=param, value=path)

    text = str(path)
    if not text or "\0" in text:
        raise fail("is not a usable path")
    if os.path.realpath(text).startswith(_PSEUDO):
        raise fail("is on a pseudo file system (/proc, /sys, /dev); choose a real folder")
    try:
        name_max = os.pathconf(_existing_ancestor(path), "PC_NAME_MAX")
        path_max = os.pathconf(_existing_ancestor(path), "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    if len(os.fsencode(os.path.abspath(text))) >= path_max or any(
        len(os.fsencode(part)) > name_max for part in path.parts
    ):
        raise fail(
            f"is longer than this file system allows (names up to {name_max} bytes, paths up "
            f"to {path_max}); choose a shorter path"
        )
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise fail(f"cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise fail(f"cannot be written: {ancestor} is not writable (permissions or read-only)")


def _existing_ancestor(path: Path) -> Path:
    current = Path(os.path.abspath(path))
    while True:
        try:
            os.stat(current)
            return current
        except OSError:
            if current.parent == current:
                return current
            current = current.parent


def write_result(path: Path, text: str, *, param: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, renamed into place.

    Raises:
        OutputError (exit 74): the write failed anyway (e.g. the disk filled up meanwhile).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OutputError(
            f"could not write the result: {reason}",
            param=param,
            value=path,
        ) from None
