"""The `npz` source: a user's arrays in a NumPy .npz file, validated before anything is
allocated (each member's .npy header is read first and checked against the member's size)."""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accelctl.data.checks import (
    DTYPE_KINDS,
    NPY_HEADERS,
    READ_ERRORS,
    check_data_file,
    check_labels,
    first_row,
    human_bytes,
    model_inputs,
)
from accelctl.data.sources import Dataset, Split, _holdout
from accelctl.errors import FieldError, UserError


@dataclass(frozen=True)
class _Member:
    """One array of an .npz file as its .npy header describes it, read before any of its data."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _NpzReader:
    """Reads the x and y arrays of one .npz file, checking every header before loading data.

    `np.load` trusts each member's header: a header claiming a huge shape makes it allocate that
    much memory, and object arrays need pickle. Here each header is read first and checked
    against the member's size in the zip, its dtype and the other array's shape.
    """

    def __init__(self, path: Path, field: str, x_key: str, y_key: str) -> None:
        self.path, self.field, self.x_key, self.y_key = path, field, x_key, y_key
        self.fix = (
            f"Set data.{field} to a .npz file written by numpy.savez with arrays "
            f"'{x_key}' and '{y_key}'."
        )

    def error(self, message: str) -> FieldError:
        return FieldError(("data", self.field), f"{self.path}: {message}")

    def read(self) -> tuple[np.ndarray, np.ndarray, np.dtype[Any]]:
        """Return x (uint8, or float32 and finite), y (int32) and x's dtype in the file."""
        self._check_path()
        try:
            with zipfile.ZipFile(self.path) as zf:
                x_member, y_member = self._members(zf)
                self._check_layout(x_member, y_member)
                y = self._load(zf, y_member)
                x = self._load(zf, x_member)
        except UserError:
            raise
        except READ_ERRORS as e:
            raise self.error(f"is not a readable .npz file ({e}). {self.fix}") from None
        y32 = check_labels(
            y, None, f"{self.path}, array {self.y_key!r}", field=("data", self.field)
        )
        return self._to_model_dtype(x), y32, x_member.dtype

    def _check_path(self) -> None:
        check_data_file(self.path, self.field, self.fix)
        try:
            with self.path.open("rb") as f:
                head = f.read(6)
        except OSError as e:
            raise self.error(f"could not be read ({e}); check its permissions.") from None
        if head == b"\x93NUMPY":
            raise self.error(
                f"holds a single array (.npy, written by numpy.save), not named arrays. {self.fix}"
            )

    def _members(self, zf: zipfile.ZipFile) -> tuple[_Member, _Member]:
        # numpy.savez stores array `k` as member `k.npy`; NpzFile answers to both names.
        infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        for key in (self.x_key, self.y_key):
            if key not in infos:
                raise self.error(
                    f"has no array {key!r} (it has: {', '.join(infos) or 'nothing'}). Set "
                    "data.x_key / data.y_key to the names used."
                )
        return self._header(zf, self.x_key, infos[self.x_key]), self._header(
            zf, self.y_key, infos[self.y_key]
        )

    def _header(self, zf: zipfile.ZipFile, key: str, info: zipfile.ZipInfo) -> _Member:
        with zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError:
                raise self.error(
                    f"member {info.filename!r} is not a NumPy array (no .npy header). {self.fix}"
                ) from None
            if version not in NPY_HEADERS:
                raise self.error(
                    f"array {key!r} uses .npy format version {version[0]}.{version[1]}, which "
                    f"accelctl does not read (1.0 and 2.0 only). {self.fix}"
                )
            shape, _, dtype = NPY_HEADERS[version](f)
            header_bytes = f.tell()
        member = _Member(key, info, tuple(int(d) for d in shape), dtype)
        if dtype.hasobject:
            raise self.error(
                f"array {key!r} is an object array ({dtype}), which is stored with pickle; "
                "accelctl does not load pickles (allow_pickle=False: unpickling can run code). "
                "Save a plain numeric array, e.g. np.asarray(a, dtype=np.float32)."
            )
        stored = info.file_size - header_bytes
        if member.nbytes != stored:
            raise self.error(
                f"array {key!r}: its header claims shape {member.shape} of {dtype} "
                f"({human_bytes(member.nbytes)}) but the file holds "
                f"{human_bytes(max(stored, 0))} of data for it; the file is corrupt or "
                "truncated. Write it again with numpy.savez."
            )
        return member

    def _check_layout(self, x: _Member, y: _Member) -> None:
        if len(x.shape) < 2 or len(y.shape) != 1 or x.shape[0] != y.shape[0]:
            raise self.error(
                f"expected {x.key} of shape (N, ...) and {y.key} of shape (N,), "
                f"got {x.shape} and {y.shape}"
            )
        if y.shape[0] == 0:
            raise self.error(f"holds no examples ({x.key} has length 0)")
        if 0 in x.shape[1:]:
            raise self.error(
                f"array {x.key!r} has shape {x.shape}: each example has 0 values (a dimension "
                "of size 0); every dimension after the first must be at least 1"
            )
        kind = x.dtype.kind
        if kind not in "buif":
            what = DTYPE_KINDS.get(kind, str(x.dtype))
            hint = (
                " (the model takes real inputs: store the real part, the magnitude, or the real "
                "and imaginary parts as separate features)"
                if kind == "c"
                else ""
            )
            raise self.error(
                f"inputs {x.key!r} must be numeric (bool, integer or float), got {x.dtype}: "
                f"{what}{hint}"
            )
        if y.dtype.kind not in "buif":
            raise self.error(f"labels {y.key!r} must be integers (class ids), got {y.dtype}")
        # Inputs other than uint8 become float32: the copy is there at the same time.
        need = x.nbytes + y.nbytes + (0 if x.dtype == np.uint8 else math.prod(x.shape) * 4)
        total = _physical_memory()
        if total is not None and need > total:
            raise self.error(
                f"loading it needs about {human_bytes(need)} of memory, more than this machine's "
                f"{human_bytes(total)}; use a smaller file"
            )

    def _load(self, zf: zipfile.ZipFile, member: _Member) -> np.ndarray:
        try:
            with zf.open(member.info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except MemoryError:
            raise self.error(
                f"array {member.key!r} needs {human_bytes(member.nbytes)} of memory, more than "
                "this machine can allocate now; use a smaller file or free memory"
            ) from None

    def _to_model_dtype(self, x: np.ndarray) -> np.ndarray:
        """uint8 images stay compact (scaled on the device); anything else becomes float32."""
        x32, bad = model_inputs(x)
        if bad is not None:
            raise self.error(f"array {self.x_key!r} at row {bad[0]}, {bad[1]}")
        return x32


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def _min_rows(fraction: float) -> int:
    """The fewest examples `_holdout` turns into a non-empty train and eval split."""
    n = 2
    while n - max(1, round(n * fraction)) < 1:
        n += 1
    return n


def load_npz(cfg: Any) -> Dataset:
    """A user's arrays; uint8 inputs are normalised to [0, 1] on device, others cast to float32.

    The class count is inferred as the largest label + 1.

    Raises:
        FieldError: on data.path / data.eval_path: a file that is missing, unreadable, corrupt
            or holds arrays that are not usable inputs and class labels; the message names the
            file, the array and the first offending row.
    """
    path = Path(cfg.path)
    x, y, stored = _NpzReader(path, "path", cfg.x_key, cfg.y_key).read()
    if cfg.eval_path is not None:
        eval_path = Path(cfg.eval_path)
        ex, ey, eval_stored = _NpzReader(eval_path, "eval_path", cfg.x_key, cfg.y_key).read()
        if ex.shape[1:] != x.shape[1:]:
            raise FieldError(
                ("data", "eval_path"),
                f"{eval_path}: eval inputs have shape {ex.shape[1:]} per example but the "
                f"training inputs in {path} have {x.shape[1:]}",
            )
        if ex.dtype != x.dtype:
            raise FieldError(
                ("data", "eval_path"),
                f"{eval_path}: eval inputs are {eval_stored} but the training inputs in {path} "
                f"are {stored}; both must be uint8 images (0..255) or both real-valued, so "
                "they are scaled alike",
            )
        unseen = ey > y.max()
        if unseen.any():
            i = first_row(unseen)
            raise FieldError(
                ("data", "eval_path"),
                f"{eval_path}: eval label {int(ey[i])} at row {i} is above every training "
                f"label in {path} (largest {int(y.max())}); the class count is inferred as the "
                "largest label + 1, so this class would never be trained. Check the labels of "
                "both files.",
            )
        train, ev = Split(x, y), Split(ex, ey)
    else:
        need = _min_rows(cfg.eval_fraction)
        if len(y) < need:
            raise FieldError(
                ("data", "path"),
                f"{path} holds {len(y)} example(s): too few to hold out eval_fraction "
                f"{cfg.eval_fraction} for evaluation and keep some for training; it needs at "
                f"least {need} (and at least train.batch_size for training), or give the eval "
                "examples in data.eval_path",
            )
        train, ev = _holdout(x, y, cfg.eval_fraction, cfg.split_seed)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else None
    num_classes = int(max(train.y.max(), ev.y.max())) + 1
    return Dataset(path.stem, train, ev, max(num_classes, 2), x_scale=scale)
