"""Model weights in and out of accelctl as flat name -> host array dicts, and their files.

Names. Every array of an `nnx.State` (parameters and other model state such as BatchNorm
statistics) is named by its path in the module tree: the path's keys joined with ".", attribute
and dict keys as they are, list indices (`nnx.List`) as decimal numbers. A transformer's first
query kernel is `blocks.0.attn.query.kernel`, its token table `embed.embedding`, a BatchNorm's
running mean `bn.mean`. The names depend on the module structure only (not on shapes, dtypes,
shardings or partitioning metadata), so they are stable across runs, devices and strategies.
RNG state (`nnx.RngState`: keys and counters of an `nnx.Rngs` kept in a module) is not a weight:
it is neither exported nor expected in a file.

Files. `save`/`load` write and read safetensors (the format of the Hugging Face hub) or npz, with
a str -> str metadata dict: in safetensors as JSON under the header's `accelctl` metadata key, in
npz as a `__metadata__` member. Both formats hold bfloat16 arrays (`ml_dtypes.bfloat16`). `save`
adds the digest of the arrays it writes (`arrays_sha256`) and `load` checks it, so a damaged
file is reported instead of loaded.

Order. `flatten_state` returns names in the state's tree order (list indices numerically), and
`digest_flat` hashes in that order too, so it reproduces `accelctl.train.state.digest`:
`digest_flat(flatten_state(params), flatten_state(model_state))` equals a run's
`params_sha256` (for a model that keeps no RNG state), whatever order the dicts were built or
read in.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from accelctl.errors import UserError

FORMATS = ("safetensors", "npz")
DTYPES: dict[str, Any] = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
METADATA_KEY = "accelctl"  # the safetensors header metadata entry holding accelctl's JSON
# Metadata entry that `save` adds: `digest_flat` of the arrays as written; `load` checks it.
DIGEST_KEY = "arrays_sha256"
NPZ_METADATA = "__metadata__"
NPZ_DTYPES = "__dtypes__"  # npz cannot describe bfloat16: such arrays are stored as uint16 bits
_NPZ_RESERVED = (NPZ_METADATA, NPZ_DTYPES)
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header size


def _name(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        text = str(key)
        if isinstance(key, str) and ("." in key or key.isdigit() or not key):
            # Such a key would collide with a nested name or a list index.
            raise ValueError(f"cannot name the state path {tuple(path)}: key {key!r}")
        parts.append(text)
    return ".".join(parts)


def _order_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key reproducing a State's tree order: list indices numerically, keys as strings."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def _is_float(dtype: Any) -> bool:
    return bool(jax.dtypes.issubdtype(np.dtype(dtype), np.floating))


def _value(var: Any) -> Any:
    return var.get_value() if isinstance(var, nnx.Variable) else var


def _weights(state: nnx.State) -> list[tuple[str, tuple[Any, ...], Any]]:
    """(name, path, variable) for every non-RNG leaf of `state`, in tree order."""
    out = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.RngState):
            continue
        out.append((_name(path), tuple(path), var))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"state paths map to duplicate names: {sorted(names)}")
    return out


def flatten_state(state: nnx.State) -> dict[str, np.ndarray]:
    """Host copies of every weight of an NNX state, by stable name (see the module docstring).

    Args:
        state: an `nnx.State` (e.g. `nnx.state(model)`, or the params / model_state of a
            TrainState) of arrays that this process can read in full (replicated or fully
            addressable shardings; gather multi-host arrays first).
    Returns:
        {name: np.ndarray} in the state's tree order, dtypes as stored (parameters are float32).
    """
    leaves = _weights(state)
    values = jax.device_get([_value(var) for _, _, var in leaves])
    return {name: np.asarray(v) for (name, _, _), v in zip(leaves, values, strict=True)}


@dataclass
class LoadReport:
    """What `unflatten_into` did.

    Attributes:
        loaded: names filled from the file.
        kept: names of the state not filled from the file (excluded, not included, or missing
            with strict=False): they keep the values the caller passed in.
        ignored: names in the file that were not used (excluded, not included, or unknown to the
            state with strict=False).
        cast: (name, file dtype, state dtype) of the arrays converted on the way in.
    """

    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    cast: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, and the dtype conversions grouped by (from, to)."""
        text = (
            f"loaded {len(self.loaded)} arrays, kept {len(self.kept)}, ignored {len(self.ignored)}"
        )
        pairs: dict[tuple[str, str], int] = {}
        for _, src, dst in self.cast:
            pairs[(src, dst)] = pairs.get((src, dst), 0) + 1
        casts = ", ".join(f"{n} {src} -> {dst}" for (src, dst), n in sorted(pairs.items()))
        return text + (f"; cast {casts}" if casts else "")


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _listing(problems: list[str], limit: int = 20) -> str:
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  " + "\n  ".join(shown) + more


def unflatten_into(
    abstract_state: nnx.State,
    flat: Mapping[str, Any],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strict: bool = True,
) -> tuple[nnx.State, LoadReport]:
    """Fill an NNX state with the arrays of a flat dict, matched by name.

    A name is selected when it matches any `include` pattern (all names when there are none)
    and no `exclude` pattern; patterns are fnmatch globs on the flat names (`head.*`,
    `blocks.*.attn.*`). Selected names are taken from `flat`; the others keep the value the
    caller passed in `abstract_state` (its freshly initialised arrays) and need not be in `flat`.

    Args:
        abstract_state: the target `nnx.State`; each leaf an array, or a ShapeDtypeStruct
            (from `nnx.eval_shape` / `jax.eval_shape`) where the value is to come from `flat`.
        flat: {name: array}, e.g. from `load` or `weights_hf.from_hf_gpt2`.
        include: glob patterns of the names to load (empty: all).
        exclude: glob patterns of the names not to load.
        strict: every selected state name must be in `flat` and every name of `flat` must be in
            the state (or be deselected). With strict=False, missing names keep their initial
            value and unknown names are ignored; both are listed in the report.
    Returns:
        (state, report): the state has `abstract_state`'s structure and Variable types, file
        arrays as host numpy arrays in the state's dtypes (floating arrays are cast, e.g. bf16
        -> fp32), the other leaves as passed in.
    Raises:
        UserError: listing, in one message, every problem: missing or unexpected names (strict),
            shapes that differ, non-float dtypes that differ, patterns that match no name
            (strict), and leaves that are neither loaded nor given an initial value.
    """
    leaves = _weights(abstract_state)
    state_names = {name for name, _, _ in leaves}
    report = LoadReport()
    problems: list[str] = []
    if strict:
        every = state_names | set(flat)
        for pattern in (*include, *exclude):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in every):
                problems.append(f"pattern {pattern!r} matches no array name")
    new_flat = []
    for name, path, var in leaves:
        target = _value(var)
        selected = _selected(name, include, exclude)
        if selected and name in flat:
            arr = np.asarray(flat[name])
            want = np.dtype(target.dtype)
            if tuple(arr.shape) != tuple(target.shape):
                problems.append(
                    f"{name}: shape {tuple(arr.shape)} in the file, "
                    f"{tuple(target.shape)} in the model"
                )
                continue
            if arr.dtype != want:
                if not (_is_float(arr.dtype) and _is_float(want)):
                    problems.append(f"{name}: dtype {arr.dtype} in the file, {want} in the model")
                    continue
                report.cast.append((name, str(arr.dtype), str(want)))
                arr = arr.astype(want)
            report.loaded.append(name)
            new_flat.append((path, var.replace(arr)))
            continue
        if selected and strict:
            problems.append(f"{name}: missing from the file (model shape {tuple(target.shape)})")
            continue
        if isinstance(target, jax.ShapeDtypeStruct):
            why = "missing from the file" if selected else "not selected by include/exclude"
            problems.append(f"{name}: {why}, and no initial value was given for it")
            continue
        report.kept.append(name)
        new_flat.append((path, var))
    for name in flat:
        if name in state_names and _selected(name, include, exclude):
            continue
        if name not in state_names and strict and _selected(name, include, exclude):
            problems.append(f"{name}: in the file but not in the model")
        else:
            report.ignored.append(name)
    if problems:
        raise UserError(
            f"the weights do not fit the model ({len(problems)} problems):{_listing(problems)}\n"
            "Load a file written for this model, or select what to load with include/exclude "
            "patterns (or turn strict off to skip missing and unknown names)."
        )
    # RNG variables are not weights: carried over untouched.
    rng = [
        (tuple(p), v) for p, v in nnx.to_flat_state(abstract_state) if isinstance(v, nnx.RngState)
    ]
    return nnx.from_flat_state(new_flat + rng), report


def digest_flat(*flats: Mapping[str, Any]) -> str:
    """SHA-256 of the arrays of one or more flat dicts, as `accelctl.train.state.digest` computes
    it: each dict's arrays in state tree order (names sorted, list indices numerically), the
    dicts one after another.

    Args:
        flats: {name: array} dicts; `digest_flat(flatten_state(params),
            flatten_state(model_state))` equals a run's `params_sha256`.
    Returns:
        The hex digest.
    """
    # The same bytes as accelctl.train.state.digest (kept apart so that reading weights does not
    # import the training package); tests/test_weights.py holds the two to each other.
    h = hashlib.sha256()
    for f in flats:
        for name in sorted(f, key=_order_key):
            a = np.ascontiguousarray(np.asarray(f[name]))
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def cast_flat(flat: Mapping[str, Any], dtype: str | None) -> dict[str, np.ndarray]:
    """The floating arrays of `flat` converted to `dtype` ("fp32", "bf16"; None: unchanged);
    integer arrays are never converted."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}", param="dtype")
    out = {}
    for name, value in flat.items():
        arr = np.asarray(value)
        if dtype is not None and _is_float(arr.dtype) and arr.dtype != DTYPES[dtype]:
            arr = arr.astype(DTYPES[dtype])
        out[name] = arr
    return out


# ------------------------------------------------------------------------------------------ files
def _check_metadata(metadata: Mapping[str, str]) -> None:
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"metadata must map str to str; not so for {bad}")


def save(
    path: str | os.PathLike[str],
    flat: Mapping[str, Any],
    *,
    metadata: Mapping[str, str],
    format: str = "safetensors",  # noqa: A002 - the word users know
    dtype: str | None = None,
    header: Mapping[str, str] | None = None,
) -> None:
    """Write a flat dict of arrays and its metadata to one file, atomically (temp file + rename).

    Args:
        path: the file to write (replaced if it exists).
        flat: {name: array}; arrays are written C-contiguous, little-endian.
        metadata: str -> str, read back by `load` (e.g. the source run, the config); `save`
            adds `arrays_sha256`, the `digest_flat` of the arrays as written (after `dtype`).
        format: "safetensors" or "npz".
        dtype: convert floating arrays to "fp32" or "bf16" first (None: as they are).
        header: further str -> str entries of the safetensors header metadata, beside
            accelctl's; e.g. {"format": "pt"}, which Hugging Face transformers requires.
    Raises:
        UserError: an unknown format or dtype, or the file cannot be written.
    """
    if format not in FORMATS:
        raise UserError(
            f"unknown format {format!r}; use one of {', '.join(FORMATS)}", param="format"
        )
    _check_metadata(metadata)
    _check_metadata(header or {})
    if DIGEST_KEY in metadata:
        raise ValueError(f"metadata key {DIGEST_KEY!r} is written by save itself")
    arrays = {n: np.ascontiguousarray(a) for n, a in cast_flat(flat, dtype).items()}
    metadata = {**metadata, DIGEST_KEY: digest_flat(arrays)}
    path = Path(path)
    reserved = [n for n in arrays if n in _NPZ_RESERVED]
    if reserved:
        raise ValueError(f"array names reserved by the file formats: {reserved}")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")
    from safetensors import SafetensorError

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if format == "safetensors":
            from safetensors.numpy import save_file

            meta = {**(header or {}), METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
            save_file(arrays, tmp, metadata=meta)
        else:
            _save_npz(tmp, arrays, metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    # np.save writes bfloat16 as an anonymous 2-byte void type; keep the bits, name the dtype.
    stored = {n: (a.view(np.uint16) if a.dtype == bf16 else a) for n, a in arrays.items()}
    dtypes = {n: "bfloat16" for n, a in arrays.items() if a.dtype == bf16}
    with open(path, "wb") as f:
        np.savez(
            f,
            **stored,
            **{
                NPZ_METADATA: np.array(json.dumps(dict(metadata), sort_keys=True)),
                NPZ_DTYPES: np.array(json.dumps(dtypes, sort_keys=True)),
            },
        )


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by `save`, or any safetensors / npz file of arrays.

    The format is recognised by the content (a zip archive is npz), not by the file name.

    Args:
        path: the file.
    Returns:
        (flat, metadata): {name: np.ndarray (read-only, possibly memory-mapped)} and the str ->
        str metadata: accelctl's entries, over any other safetensors header entries (e.g. the
        {"format": "pt"} of a Hugging Face file); {} when the file has none.
    Raises:
        UserError: naming the path and what is wrong: missing, unreadable, neither format,
            truncated, a corrupt header, a member that is not an array, arrays that do not
            match the `arrays_sha256` written with them.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read weights file {path}: {e.strerror or e}") from e
    flat, meta = _load_npz(path) if head[:4] == _ZIP_MAGIC else _load_safetensors(path, head, size)
    if DIGEST_KEY in meta and digest_flat(flat) != meta[DIGEST_KEY]:
        raise _bad(path, "is corrupt: its arrays do not match the digest written with them")
    return flat, meta


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"weights file {path} {what}; export it again (safetensors or npz)")


def _load_safetensors(path: Path, head: bytes, size: int) -> tuple[dict, dict[str, str]]:
    if len(head) < 8:
        raise _bad(path, f"is {size} bytes long: too short for safetensors or npz")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or n > size - 8:
        if n > _MAX_HEADER:
            raise _bad(path, "is neither safetensors (no valid header length) nor npz (not a zip)")
        raise _bad(
            path, f"is truncated: its safetensors header needs {n} bytes, the file has {size - 8}"
        )
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _bad(
            path, "is neither safetensors (the header is not JSON) nor npz (not a zip)"
        ) from None
    if not isinstance(header, dict):
        raise _bad(path, "has a safetensors header that is not a JSON object")
    meta_raw = header.get("__metadata__") or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise _bad(path, "has safetensors metadata that is not a JSON object of strings")
    try:
        end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise _bad(path, "has a safetensors header entry without valid data_offsets") from None
    if 8 + n + end > size:
        raise _bad(path, f"is truncated: its arrays need {8 + n + end} bytes, the file has {size}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        flat = load_file(path)
    except (SafetensorError, ValueError, TypeError, KeyError) as e:
        raise _bad(path, f"is not valid safetensors ({type(e).__name__}: {e})") from None
    meta = {k: v for k, v in meta_raw.items() if k != METADATA_KEY}
    if METADATA_KEY in meta_raw:
        meta.update(_parse_metadata(path, meta_raw[METADATA_KEY]))
    return flat, meta


def _parse_metadata(path: Path, text: str) -> dict[str, str]:
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "has accelctl metadata that is not a JSON object of strings")
    return meta


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            members = {name: z[name] for name in z.files}
    except ValueError as e:  # object arrays need pickle: not weights
        raise _bad(path, f"has a member that is not a numeric array ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise _bad(path, f"is a damaged npz archive ({type(e).__name__}: {e})") from None
    meta: dict[str, str] = {}
    if NPZ_METADATA in members:
        meta = _parse_metadata(path, str(members.pop(NPZ_METADATA)[()]))
    dtypes: dict[str, str] = {}
    if NPZ_DTYPES in members:
        dtypes = json.loads(str(members.pop(NPZ_DTYPES)[()]))
    flat = {}
    for name, arr in members.items():
        if dtypes.get(name) == "bfloat16" and arr.dtype == np.uint16:
            arr = arr.view(ml_dtypes.bfloat16)
        elif not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise _bad(path, f"has a member {name!r} of dtype {arr.dtype}, not a numeric array")
        flat[name] = arr
    return flat, meta
