"""The `python` source: the user's own loader, called by import path.

`data: {source: python, target: pkg.mod:fn, args: {...}}` calls `fn(**args)`, which returns
`{"train": TRAIN, "eval": EVAL}` (eval optional: then `eval_fraction` of TRAIN is held out, seeded
by `split_seed`, as for npz). Each split is either

- a tuple of in-memory arrays `(x, y)`: validated like an npz file's arrays (shapes, numeric
  inputs, finite floats, integer labels in range) and kept as a `Split`, so it gets everything the
  built-in sources get (device cache, augmentation, normalisation, per-process slices); or
- a random-access source: `__len__` and `__getitem__`, plus `__getitems__` when present (the
  protocol of tfds's `data_source`, ArrayRecord and Grain's `RandomAccessDataSource`; a list of
  rows works too). It is wrapped in a `RandomAccessSplit` that reads only the rows a batch needs,
  in the prefetch thread: batched through `__getitems__`, else `__getitem__` in `read_threads`
  threads (which must then be safe to call concurrently). A row is an `(x, y)` tuple or a dict
  keyed by `x_key` / `y_key`.

A random-access source is never read whole unless the cache mode says so: `cache: device | host`
reads it once; `cache: auto` reads it onto the devices when its size, estimated as one row's
bytes x its length, fits a quarter of device memory, and streams it otherwise (never into host
memory, which may not hold it). Its class count cannot be inferred without reading every label,
so `num_classes` must be given; for arrays it defaults to the largest label + 1.

The first rows of a random-access source (`PROBE_ROWS`) are read and validated when the data set
is built, so a wrong layout fails before anything compiles; every later batch is validated as it
is read (a row of another shape or dtype, a label out of range, NaN/inf), naming the row.
uint8 inputs stay uint8 on the host and are scaled by 1/255 on the device like images; other
numeric inputs become float32.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from accelctl.data.checks import check_labels, first_row
from accelctl.data.random_access import (
    TARGET,
    RandomAccessSplit,
    RowReader,
    check_numeric,
    to_model_dtype,
)
from accelctl.data.sources import Dataset, Split, _holdout, holdout_indices
from accelctl.errors import FieldError
from accelctl.imports import describe_error, import_target

ARGS = ("data", "args")

RETURNS = (
    'it must return {"train": TRAIN, "eval": EVAL} (eval optional), each a tuple of arrays '
    "(x, y) or a random-access source (__len__ and __getitem__)"
)


# ------------------------------------------------------------------------------- in-memory arrays
def _array_split(value: tuple[Any, ...], where: str, num_classes: int | None) -> Split:
    """Validate a split given as (x, y) arrays and return it in the model's dtypes."""
    if len(value) != 2:
        raise FieldError(TARGET, f"{where} is a tuple of {len(value)} items; give (x, y)")
    try:
        x, y = np.asarray(value[0]), np.asarray(value[1])
    except ValueError as e:  # ragged nested lists
        raise FieldError(TARGET, f"{where}: x or y is not a rectangular array ({e})") from None
    if x.ndim < 2:
        raise FieldError(
            TARGET,
            f"{where}: x has shape {x.shape}; expected (N, ...) with N examples of at least one "
            "value each (a single feature is shape (N, 1))",
        )
    if y.ndim == 1 and x.shape[0] != y.shape[0]:
        raise FieldError(
            TARGET,
            f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}; give one label per example",
        )
    if x.shape[0] == 0:
        raise FieldError(TARGET, f"{where} holds no examples (x has length 0)")
    if 0 in x.shape[1:]:
        raise FieldError(
            TARGET,
            f"{where}: x has shape {x.shape}: each example has 0 values; every dimension after "
            "the first must be at least 1",
        )
    check_numeric(x.dtype, f"{where}: x")
    y32 = check_labels(y, num_classes, f"{where}, y", field=TARGET)
    return Split(to_model_dtype(x, where), y32)


# ------------------------------------------------------------------------------------ the loader
def _check_args(fn: Callable[..., Any], args: Mapping[str, Any], target: str) -> None:
    """Check `fn(**args)` against fn's signature before calling it.

    Raises:
        FieldError: on data.args.NAME, an argument fn does not take (with the closest names);
            on data.args, a parameter without a default that args does not give.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): just call it
        return
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p.name for p in params if p.kind in keyword]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        for name in args:
            if name not in named:
                close = difflib.get_close_matches(name, named, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise FieldError(
                    (*ARGS, name),
                    f"{target} takes no argument {name!r}; {hint}it takes: "
                    f"{', '.join(named) or 'no keyword arguments'}",
                )
    missing = [
        p.name
        for p in params
        if p.kind in keyword and p.default is inspect.Parameter.empty and p.name not in args
    ]
    if missing:
        example = ", ".join(f"{m}: ..." for m in missing)
        raise FieldError(
            ARGS,
            f"{target} needs {', '.join(repr(m) for m in missing)}, which data.args does not "
            f"give; add them, e.g. args: {{{example}}}",
        )


def _call_loader(cfg: Any, obj: Any = None) -> Any:
    """Import the loader (or take `obj`), check args against its signature, call it.

    Args:
        cfg: the PythonData section.
        obj: None imports `cfg.target`; a mapping is taken as what a loader returns; anything
            else is the loader itself (the Python API's `data=`).
    Returns:
        What the loader returned.
    """
    if isinstance(obj, Mapping):
        return obj
    fn = import_target(cfg.target, TARGET) if obj is None else obj
    if not callable(fn):
        raise FieldError(
            TARGET,
            f"{cfg.target} is a {type(fn).__name__}, not callable; name the function (or "
            "class) that loads the data",
        )
    _check_args(fn, cfg.args, cfg.target)
    try:
        return fn(**cfg.args)
    except FieldError:
        raise
    except Exception as e:
        raise FieldError(TARGET, f"{cfg.target} raised {describe_error(e)}") from e


def _values(out: Any, target: str) -> tuple[Any, Any]:
    """The loader's (train, eval) values; eval is None when not given."""
    if not isinstance(out, Mapping):
        raise FieldError(TARGET, f"{target} returned a {type(out).__name__}; {RETURNS}")
    unknown = [str(k) for k in out if k not in ("train", "eval")]
    if unknown or "train" not in out:
        got = ", ".join(repr(str(k)) for k in out) or "nothing"
        raise FieldError(TARGET, f"{target} returned a dict with keys {got}; {RETURNS}")
    return out["train"], out.get("eval")


def _is_arrays(value: Any, where: str) -> bool:
    """True for (x, y) arrays, False for a random-access source; anything else is an error."""
    if isinstance(value, tuple):
        return True
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        raise FieldError(
            TARGET,
            f"{where} is a single array ({type(value).__name__}); give the inputs and the "
            "labels as a tuple (x, y)",
        )
    # These have __len__ and __getitem__ too, but are never a source of rows 0..n-1.
    if isinstance(value, Mapping | str | bytes):
        raise FieldError(
            TARGET,
            f"{where} is a {type(value).__name__}; give a tuple of arrays (x, y), e.g. "
            '(d["x"], d["y"]), or a random-access source of rows',
        )
    if isinstance(value, list) and len(value) == 2 and all(hasattr(v, "__array__") for v in value):
        # Rows are tuples or dicts, never bare arrays: this is [x, y] meant as arrays.
        raise FieldError(TARGET, f"{where} is a list [x, y]; give a tuple (x, y)")
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return False
    raise FieldError(
        TARGET,
        f"{where} is a {type(value).__name__}; give a tuple of arrays (x, y) or a random-access "
        "source with __len__ and __getitem__ (an iterator or a generator cannot be read by "
        "index: collect it into arrays or a list of (x, y) rows)",
    )


def _too_few(n: int, fraction: float, where: str) -> FieldError | None:
    n_eval = max(1, round(n * fraction))
    if n - n_eval >= 1:
        return None
    return FieldError(
        TARGET,
        f"{where} holds {n} example(s): too few to hold out eval_fraction {fraction} for "
        'evaluation and keep some for training; return more, or return "eval" too',
    )


def load(cfg: Any, obj: Any = None) -> Dataset:
    """Call the `data` section's loader and wrap what it returns (see the module docstring).

    Args:
        cfg: the PythonData config section.
        obj: the loader itself, or what it returns ({"train": ..., "eval": ...}), instead of
            importing `cfg.target` (the Python API); None imports it.
    Returns:
        Dataset: each split a `Split` (arrays) or a `RandomAccessSplit`; x_scale 1/255 for uint8
        inputs, else None (float32).
    Raises:
        FieldError: the target cannot be imported or called with args, it raises, it returns
            something else than documented, or the data it returns is not usable (the message
            names the split and the first offending row).
    """
    out = _call_loader(cfg, obj)
    values = dict(zip(("train", "eval"), _values(out, cfg.target), strict=True))
    where = {name: f"{cfg.target}'s {name!r} split" for name in values}
    arrays = {
        name: _is_arrays(value, where[name]) for name, value in values.items() if value is not None
    }
    if not all(arrays.values()) and cfg.num_classes is None:
        raise FieldError(
            ("data", "num_classes"),
            "a random-access source is read a batch at a time, never whole, so the class count "
            "cannot be inferred from its labels; set data.num_classes (e.g. 10)",
        )

    def split_of(name: str) -> Split | RowReader:
        if arrays[name]:
            return _array_split(values[name], where[name], cfg.num_classes)
        return RowReader(
            values[name],
            where=where[name],
            x_key=cfg.x_key,
            y_key=cfg.y_key,
            num_classes=cfg.num_classes,
            threads=cfg.read_threads,
        )

    train_part = split_of("train")
    if "eval" in arrays:
        eval_part = split_of("eval")
        train = train_part if isinstance(train_part, Split) else RandomAccessSplit(train_part)
        ev = eval_part if isinstance(eval_part, Split) else RandomAccessSplit(eval_part)
        _check_alike(train, ev, where)
    elif isinstance(train_part, Split):
        if (error := _too_few(len(train_part), cfg.eval_fraction, where["train"])) is not None:
            raise error
        train, ev = _holdout(train_part.x, train_part.y, cfg.eval_fraction, cfg.split_seed)
    else:
        if (error := _too_few(train_part.length, cfg.eval_fraction, where["train"])) is not None:
            raise error
        tr, ev_rows = holdout_indices(train_part.length, cfg.eval_fraction, cfg.split_seed)
        train, ev = RandomAccessSplit(train_part, tr), RandomAccessSplit(train_part, ev_rows)
    num_classes = cfg.num_classes or _inferred_classes(
        train,  # type: ignore[arg-type]  # arrays: a random-access source needs num_classes
        ev,  # type: ignore[arg-type]
        where["eval"] if "eval" in arrays else None,
    )
    scale = 1.0 / 255.0 if train.x_dtype == np.uint8 else None
    module, _, attr = cfg.target.rpartition(":")
    name = f"{module.rpartition('/')[2]}:{attr}"  # a file target by its file name alone
    return Dataset(name, train, ev, max(num_classes, 2), x_scale=scale)


def _check_alike(train: Any, ev: Any, where: dict[str, str]) -> None:
    if ev.example_shape != train.example_shape:
        raise FieldError(
            TARGET,
            f"{where['eval']} has examples of shape {ev.example_shape} but {where['train']} has "
            f"{train.example_shape}; both must have the same shape",
        )
    if ev.x_dtype != train.x_dtype:
        raise FieldError(
            TARGET,
            f"{where['eval']} has {ev.x_dtype} inputs (as the model reads them) but "
            f"{where['train']} has {train.x_dtype}; both must be uint8 images (0..255) or both "
            "real-valued, so they are scaled alike",
        )


def _inferred_classes(train: Split, ev: Split, eval_where: str | None) -> int:
    """Largest label + 1 (arrays only: random-access sources need num_classes given).

    Args:
        eval_where: names the eval split when the loader returned it, None for a hold-out.
    """
    top = int(train.y.max())
    unseen = ev.y > top
    if eval_where is not None and unseen.any():
        i = first_row(unseen)
        raise FieldError(
            TARGET,
            f"{eval_where}: label {int(ev.y[i])} at row {i} is above every training label "
            f"(largest {top}); the class count is inferred as the largest label + 1, so this "
            "class would never be trained. Check the labels, or set data.num_classes.",
        )
    return top + 1
