"""Random-access sources of rows, read a batch at a time: the `python` source's streamed split.

A source has `__len__` and `__getitem__`, plus `__getitems__` when present (the protocol of tfds's
`data_source`, ArrayRecord and Grain's `RandomAccessDataSource`; a list of rows works too). A row
is an `(x, y)` tuple or a dict keyed by `x_key` / `y_key`. `RowReader` reads rows by index (one
batched `__getitems__` call per chunk, else `__getitem__` in a thread pool, which must then be
safe to call concurrently) and checks every row against the first: the same x shape and dtype,
an integer label below the class count, finite floats; a mismatch names the row.
`RandomAccessSplit` is a split of such a source (all rows or a hold-out), never read whole except
by `load()` when a cache mode asks for it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from accelctl.data.checks import DTYPE_KINDS, model_inputs
from accelctl.data.sources import Split
from accelctl.errors import FieldError

TARGET = ("data", "target")
PROBE_ROWS = 32  # rows of a random-access source read and checked when the data set is built
LOAD_CHUNK = 1024  # rows per read when a random-access split is cached whole
_MIN_PARALLEL = 32  # rows per `__getitems__` call worth a thread of its own


@dataclass(frozen=True)
class _Layout:
    """What every row of a random-access source must look like: row 0's x."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]  # as the source stores it

    @property
    def model_dtype(self) -> np.dtype[Any]:
        return _model_dtype(self.dtype)


def _model_dtype(stored: np.dtype[Any]) -> np.dtype[Any]:
    """uint8 stays compact (scaled on the device); every other numeric dtype becomes float32."""
    return np.dtype(np.uint8) if stored == np.uint8 else np.dtype(np.float32)


def check_numeric(dtype: np.dtype[Any], what: str) -> None:
    """Raise a FieldError on data.target unless `dtype` is bool, integer or float.

    Args:
        dtype: the inputs' dtype.
        what: names the inputs in the message, e.g. "pkg.mod:load's 'train' split: x".
    """
    if dtype.kind not in "buif":
        kind = DTYPE_KINDS.get(dtype.kind, str(dtype))
        raise FieldError(
            TARGET, f"{what} must be numeric (bool, integer or float), got {dtype}: {kind}"
        )


def to_model_dtype(x: np.ndarray, where: str, rows: Sequence[int] | None = None) -> np.ndarray:
    """x as the model reads it (uint8, or float32 and finite), naming the first bad value.

    Args:
        x: (N, ...) inputs as loaded.
        where: what holds them, for the message.
        rows: the source row of each of x's rows (None: row i is row i).
    Returns:
        x itself when uint8, else a float32 copy.
    Raises:
        FieldError: on data.target, a NaN/inf (or a value beyond float32) in float inputs.
    """
    x32, bad = model_inputs(x)
    if bad is not None:
        row = bad[0] if rows is None else rows[bad[0]]
        raise FieldError(TARGET, f"{where}: x at row {row}, {bad[1]}")
    return x32


# ---------------------------------------------------------------------------- random-access rows
class RowReader:
    """Reads and validates rows of a random-access source by index (thread pool, or batched).

    Args:
        source: has `__len__` and `__getitem__` (and maybe `__getitems__`).
        where: names it in messages, e.g. "pkg.mod:load's train split".
        x_key, y_key: keys of dict rows.
        num_classes: every label must be below it.
        threads: `__getitem__` calls (or `__getitems__` chunks) run in this many threads.
    """

    def __init__(
        self,
        source: Any,
        *,
        where: str,
        x_key: str,
        y_key: str,
        num_classes: int,
        threads: int,
    ) -> None:
        self.source, self.where = source, where
        self.x_key, self.y_key = x_key, y_key
        self.num_classes, self.threads = num_classes, threads
        try:
            self.length = int(len(source))
        except Exception as e:
            raise FieldError(TARGET, f"{where}: len() raised {type(e).__name__}: {e}") from e
        if self.length <= 0:
            raise FieldError(TARGET, f"{where} is empty (len() is {self.length})")
        getitems = getattr(source, "__getitems__", None)
        self._getitems = getitems if callable(getitems) else None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.layout = self._probe(min(PROBE_ROWS, self.length))

    def _error(self, row: int, message: str) -> FieldError:
        return FieldError(TARGET, f"{self.where}, row {row}: {message}")

    def _probe(self, count: int) -> _Layout:
        """Fix the layout from row 0 and validate the first `count` rows with it."""
        keys = list(range(count))
        rows = self._read(keys)
        x0, _ = self._fields(rows[0], 0)
        if x0.ndim == 0:
            raise self._error(
                0, "x is a scalar; each x must be an array of at least one value (shape (1,))"
            )
        if 0 in x0.shape:
            raise self._error(0, f"x has shape {x0.shape}: every dimension must be at least 1")
        check_numeric(x0.dtype, f"{self.where}, row 0: x")
        layout = _Layout(tuple(int(d) for d in x0.shape), x0.dtype)
        self.layout = layout
        self.assemble(rows, keys)
        return layout

    def _pool_of(self) -> ThreadPoolExecutor:
        # The train and eval prefetch threads may read a held-out source at the same time.
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="accelctl-rows")
            return self._pool

    def _get_one(self, key: int) -> Any:
        try:
            return self.source[key]
        except Exception as e:
            raise self._error(key, f"reading it raised {type(e).__name__}: {e}") from e

    def _get_many(self, keys: list[int]) -> list[Any]:
        assert self._getitems is not None
        try:
            rows = list(self._getitems(keys))
        except Exception as e:
            raise FieldError(
                TARGET,
                f"{self.where}: __getitems__ of rows {keys[0]}..{keys[-1]} raised "
                f"{type(e).__name__}: {e}",
            ) from e
        if len(rows) != len(keys):
            raise FieldError(
                TARGET,
                f"{self.where}: __getitems__ returned {len(rows)} rows for {len(keys)} indices; "
                "it must return one row per index, in order",
            )
        return rows

    def _read(self, keys: list[int]) -> list[Any]:
        """The rows at `keys`, in order."""
        if self._getitems is not None:
            chunks = max(1, min(self.threads, len(keys) // _MIN_PARALLEL))
            if chunks == 1:
                return self._get_many(keys)
            parts = np.array_split(np.asarray(keys), chunks)
            done = self._pool_of().map(self._get_many, [p.tolist() for p in parts])
            return [row for part in done for row in part]
        if self.threads == 1 or len(keys) == 1:
            return [self._get_one(k) for k in keys]
        return list(self._pool_of().map(self._get_one, keys))

    def _fields(self, row: Any, key: int) -> tuple[np.ndarray, Any]:
        if isinstance(row, Mapping):
            for field, k in (("x_key", self.x_key), ("y_key", self.y_key)):
                if k not in row:
                    have = ", ".join(repr(str(n)) for n in row) or "none"
                    raise FieldError(
                        ("data", field),
                        f"{self.where}, row {key}: the row has no key {k!r} (its keys: {have}); "
                        f"set data.{field} to the key of the "
                        + ("input" if field == "x_key" else "class label"),
                    )
            x, y = row[self.x_key], row[self.y_key]
        elif isinstance(row, tuple | list) and len(row) == 2:
            x, y = row
        else:
            raise self._error(
                key,
                f"the row is a {type(row).__name__}; each row must be an (x, y) tuple or a dict "
                f"with keys {self.x_key!r} and {self.y_key!r} (data.x_key / data.y_key)",
            )
        try:
            return np.asarray(x), y
        except ValueError as e:
            raise self._error(key, f"x is not a rectangular array ({e})") from None

    def _label(self, y: Any, key: int) -> int:
        a = np.asarray(y)
        if a.ndim != 0 and a.shape != (1,):
            raise self._error(
                key, f"y has shape {a.shape}; each row's label is one integer class id"
            )
        a = a.reshape(())
        if a.dtype.kind not in "iu":
            raise self._error(
                key,
                f"y is {a.item()!r} ({a.dtype}); labels must be integer class ids 0 .. "
                f"{self.num_classes - 1}",
            )
        v = int(a)
        if not 0 <= v < self.num_classes:
            raise self._error(
                key,
                f"label {v} is not a class id: with {self.num_classes} classes "
                f"(data.num_classes) the labels must be 0 .. {self.num_classes - 1}",
            )
        return v

    def assemble(self, rows: list[Any], keys: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Stack rows into (x in the model's dtype, int32 labels), checking each against the
        layout; the message of a mismatch names the row."""
        layout = self.layout
        x = np.empty((len(rows), *layout.shape), layout.dtype)
        y = np.empty((len(rows),), np.int32)
        for j, (row, key) in enumerate(zip(rows, keys, strict=True)):
            xj, yj = self._fields(row, key)
            if xj.shape != layout.shape or xj.dtype != layout.dtype:
                raise self._error(
                    key,
                    f"x has shape {xj.shape} and dtype {xj.dtype}, but row 0 has "
                    f"{layout.shape} {layout.dtype}; every row must have the same shape and "
                    "dtype (resize or pad in the loader, and cast with np.asarray(x, dtype))",
                )
            x[j] = xj
            y[j] = self._label(yj, key)
        return to_model_dtype(x, self.where, keys), y

    def read(self, keys: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the rows at `keys` (source indices), validated."""
        keys = [int(k) for k in keys]
        return self.assemble(self._read(keys), keys)


class RandomAccessSplit:
    """A split of a random-access source: `take(idx)` reads only those rows.

    Args:
        reader: reads rows of the source.
        rows: the source rows this split holds (a hold-out), or None for all of them.
    """

    # `cache: auto` streams it rather than read it whole into host memory (see plan_cache).
    auto_host = False

    def __init__(self, reader: RowReader, rows: np.ndarray | None = None) -> None:
        self.reader, self.rows = reader, rows

    def __len__(self) -> int:
        return self.reader.length if self.rows is None else len(self.rows)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.reader.layout.shape

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return self.reader.layout.model_dtype

    @property
    def nbytes(self) -> int:
        """Estimated from the first row: all rows have its shape and dtype."""
        return len(self) * (math.prod(self.example_shape) * self.x_dtype.itemsize + 4)

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (x, int32 y) of the examples at positions `idx` of this split, in order."""
        idx = np.asarray(idx)
        keys = idx if self.rows is None else self.rows[idx]
        return self.reader.read(keys.tolist())

    def load(self) -> Split:
        """Read the whole split into host memory (for `cache: device | host`)."""
        n = len(self)
        x = np.empty((n, *self.example_shape), self.x_dtype)
        y = np.empty((n,), np.int32)
        for start in range(0, n, LOAD_CHUNK):
            stop = min(start + LOAD_CHUNK, n)
            x[start:stop], y[start:stop] = self.take(np.arange(start, stop))
        return Split(x, y)
