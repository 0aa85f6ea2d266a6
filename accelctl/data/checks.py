"""Checks shared by the file-reading sources: a data file that exists and is readable, class
labels that fit int32 and the class count, inputs the model can read (finite float32), and
readable byte counts for messages."""

from __future__ import annotations

import math
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from accelctl.errors import FieldError

# Class ids are stored as int32 and the inferred class count (max label + 1) must fit too.
LABEL_LIMIT = int(np.iinfo(np.int32).max)
NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# Reading errors of a damaged zip or .npy member: zipfile, zlib and numpy's header parser raise
# all of these for bad bytes (RuntimeError: a flipped "encrypted" flag; UnicodeDecodeError: a
# member name flagged UTF-8 that is not).
READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
    struct.error,
)
DTYPE_KINDS = {
    "c": "complex numbers",
    "U": "strings",
    "S": "byte strings",
    "M": "dates",
    "m": "time spans",
    "V": "structured records",
    "O": "Python objects",
}


def human_bytes(n: int) -> str:
    """A byte count for people: 1200 -> '1.2 KB'."""
    if n < 1000:
        return f"{n} bytes"
    exp = min(int(math.log10(n)) // 3, 5)
    return f"{n / 1000**exp:.1f} {' KMGTP'[exp]}B"


def first_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def check_data_file(path: Path, field: str, fix: str) -> int:
    """Check that `path` is an existing regular file and return its size in bytes.

    Args:
        path: the data file.
        field: the `data` field that names it, e.g. "path".
        fix: a sentence saying what the field should name, appended to the message.
    Raises:
        FieldError: on ("data", field): missing, a directory, not a regular file, or its
            metadata cannot be read (e.g. a folder above it denies access).
    """
    try:
        st = path.stat()  # Path.exists() would raise on EACCES instead of answering
    except (FileNotFoundError, NotADirectoryError):
        raise FieldError(("data", field), f"{path} does not exist. {fix}") from None
    except OSError as e:
        raise FieldError(("data", field), f"{path} could not be read ({e}). {fix}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FieldError(("data", field), f"{path} is a directory, not a file. {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise FieldError(("data", field), f"{path} is not a regular file. {fix}")
    return st.st_size


def check_labels(
    y: np.ndarray,
    num_classes: int | None,
    where: str,
    *,
    field: tuple[str | int, ...] = ("data", "path"),
) -> np.ndarray:
    """Check that `y` holds class ids and return them as int32.

    Args:
        y: (N,) labels as stored in a file.
        num_classes: every label must be below it; None when the class count is inferred from
            the labels (max + 1), which then only have to fit int32.
        where: what holds the labels, for the message, e.g. "train.npz, array 'y'".
        field: the config field the error is located at.
    Returns:
        y as int32, shape (N,).
    Raises:
        FieldError: y is not 1-D integers in [0, num_classes); the message names the first
            offending row.
    """

    def fail(message: str) -> FieldError:
        return FieldError(field, f"{where}: {message}")

    if y.ndim != 1:
        raise fail(f"labels must have shape (N,), got {y.shape}")
    kind = y.dtype.kind
    if kind == "b":
        raise fail(
            "labels are booleans; store the class ids as integers (e.g. y.astype(np.int64), "
            "False = class 0, True = class 1)"
        )
    if kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if whole.all():
            raise fail(
                f"labels must be integers (class ids), got {y.dtype} holding whole numbers; "
                "store them as integers (e.g. y.astype(np.int64))"
            )
        i = first_row(~whole)
        raise fail(
            f"labels must be integers (class ids 0, 1, ...), got {y.dtype}; row {i} holds "
            f"{y[i]}, which is not a class id"
        )
    if kind not in "iu":
        raise fail(f"labels must be integers (class ids 0, 1, ...), got {y.dtype}")
    negative = y < 0
    if negative.any():
        i = first_row(negative)
        raise fail(f"labels must be >= 0, found {int(y[i])} at row {i}")
    limit = LABEL_LIMIT if num_classes is None else num_classes
    above = y >= limit
    if above.any():
        i = first_row(above)
        if num_classes is None:
            raise fail(
                f"label {int(y[i])} at row {i} is too large: class ids must be below "
                f"{LABEL_LIMIT} (2**31 - 1) so they and the class count fit int32; number "
                "the classes 0, 1, ..., C - 1"
            )
        raise fail(
            f"label {int(y[i])} at row {i} is not a class id: with {num_classes} classes the "
            f"labels must be 0 .. {num_classes - 1}"
        )
    return y.astype(np.int32)


def model_inputs(x: np.ndarray) -> tuple[np.ndarray, tuple[int, str] | None]:
    """x as the model reads it: uint8 images stay compact (scaled on the device), anything else
    becomes float32, which must be finite.

    Args:
        x: (N, ...) inputs as loaded.
    Returns:
        (x itself when uint8 else a float32 copy, None) or, at the first NaN/inf (or a value
        beyond float32) of float inputs, (x32, (its row, "column C is ...: what to do")).
    """
    if x.dtype == np.uint8:
        return x, None
    with np.errstate(over="ignore"):  # values beyond float32 become inf: reported below
        x32 = x.astype(np.float32)
    bad = first_nonfinite(x32) if x.dtype.kind == "f" else None
    if bad is None:
        return x32, None
    row, pos = bad
    value = x[(row, *pos)]
    at = f"column {pos[0]}" if len(pos) == 1 else f"position {pos}"
    reason = (
        f"is {value}, too large for float32 (the model reads float32 inputs); rescale the inputs"
        if np.isfinite(value)
        else f"is {value}; inputs must be finite numbers (replace or drop that row)"
    )
    return x32, (row, f"{at} {reason}")


def first_nonfinite(x: np.ndarray) -> tuple[int, tuple[int, ...]] | None:
    """Return (row, index within the example) of the first NaN or infinity in x, else None."""
    flat = x.reshape(len(x), -1)
    rows = max(1, (1 << 22) // flat.shape[1])  # bounded temporaries, ~4 MB of flags per chunk
    for start in range(0, len(flat), rows):
        bad = ~np.isfinite(flat[start : start + rows])
        if bad.any():
            r, c = np.argwhere(bad)[0]
            pos = np.unravel_index(int(c), x.shape[1:])
            return start + int(r), tuple(int(i) for i in pos)
    return None
