"""Bad data files: each gives a FieldError naming the file (and the array and first bad row)
instead of a traceback, a silent wrong label or a huge allocation; plus a fuzz test of the npz
reader over random contents and byte-level corruption.

ACCELCTL_FUZZ_EXAMPLES=2000 runs the fuzz tests long (default: a small, fixed set for CI).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from accelctl import config
from accelctl.data import Dataset, npz
from accelctl.data.checks import check_labels
from accelctl.data.sources import load_npz
from accelctl.data.tokens import load_tokens, min_text_bytes
from accelctl.errors import FieldError, UserError


def _cfg(text: str) -> Any:
    return config.load_text(f"data: {text}", "x.yaml").data


def _load(path: Path, extra: str = "") -> Dataset:
    return load_npz(_cfg(f"{{source: npz, path: '{path}'{extra}}}"))


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _error(path: Path, extra: str = "", field: str = "path", named: Path | None = None) -> str:
    """Load and return the message of the FieldError it must raise on data.<field>."""
    with pytest.raises(FieldError) as info:
        _load(path, extra)
    assert info.value.path == ("data", field)
    msg = str(info.value)
    assert str(named or path) in msg  # every message names the file
    return msg


def _bad(tmp_path: Path, **arrays: Any) -> str:
    return _error(_npz(tmp_path / "d.npz", **arrays))


def _zip(path: Path, members: dict[str, bytes], *, compress: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npy_claiming(shape: tuple[int, ...], dtype: str, data: bytes, version: int = 1) -> bytes:
    """A .npy member whose header claims `shape` but whose data is only `data`."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    if version == 1:
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue() + data


Y4 = np.arange(4) % 2


# ------------------------------------------------------------------------------ shapes, sizes
@pytest.mark.parametrize("shape", [(5, 0), (5, 3, 0), (5, 0, 2)])
def test_features_of_width_zero(tmp_path: Path, shape: tuple[int, ...]) -> None:
    msg = _bad(tmp_path, x=np.zeros(shape), y=np.arange(5) % 2)
    assert f"shape {shape}" in msg and "0 values" in msg and "'x'" in msg


def test_one_row_cannot_be_split(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((1, 3)), y=np.array([0]))
    assert "holds 1 example(s)" in msg and "needs at least 2" in msg and "eval_path" in msg


def test_minimum_rows_for_the_holdout_is_exact(tmp_path: Path) -> None:
    # eval_fraction 0.95: round(10 * 0.95) = 10 holds out all 10 rows, round(11 * 0.95) = 10
    # all but one of 11.
    extra = ", eval_fraction: 0.95"
    path = _npz(tmp_path / "d.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2)
    assert "needs at least 11" in _error(path, extra)
    path = _npz(tmp_path / "d.npz", x=np.zeros((11, 2)), y=np.arange(11) % 2)
    ds = _load(path, extra)
    assert len(ds.train) == 1 and len(ds.eval) == 10


def test_one_row_with_an_eval_file_loads(tmp_path: Path) -> None:
    # With the eval examples in their own file, one training row is a (tiny) valid data set;
    # whether it fills a batch is train.batch_size's check.
    train = _npz(tmp_path / "t.npz", x=np.ones((1, 2)), y=np.array([1]))
    ev = _npz(tmp_path / "e.npz", x=np.ones((2, 2)), y=np.array([0, 1]))
    ds = _load(train, f", eval_path: '{ev}'")
    assert len(ds.train) == 1 and len(ds.eval) == 2 and ds.num_classes == 2


def test_length_mismatch_and_flat_inputs(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((5, 2)), y=np.arange(4))
    assert "(5, 2)" in msg and "(4,)" in msg
    msg = _bad(tmp_path, x=np.zeros(4), y=Y4)
    assert "expected x of shape (N, ...)" in msg
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.zeros((4, 1), np.int64))
    assert "(4, 1)" in msg


def test_no_examples(tmp_path: Path) -> None:
    assert "holds no examples" in _bad(tmp_path, x=np.zeros((0, 3)), y=np.zeros(0, np.int64))


# ----------------------------------------------------------------------------- the npz itself
def test_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    x = np.empty((4, 2), dtype=object)
    x[:] = 1.0
    msg = _bad(tmp_path, x=x, y=Y4)
    assert "object array" in msg and "pickle" in msg and "'x'" in msg


def test_pickled_labels_are_refused(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 1, "a", None], dtype=object))
    assert "object array" in msg and "'y'" in msg


def test_member_that_is_not_an_array(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": b"hello, not an array", "y.npy": _npy(Y4)})
    msg = _error(path)
    assert "'x.npy' is not a NumPy array" in msg
    # numpy's NpzFile also answers to a member without the .npy suffix (as raw bytes).
    path = _zip(tmp_path / "d.npz", {"x": b"raw bytes", "y.npy": _npy(Y4)})
    assert "'x' is not a NumPy array" in _error(path)


def test_a_directory_an_npy_file_and_garbage(tmp_path: Path) -> None:
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert "is a directory" in _error(folder)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros((4, 2)))
    assert "single array (.npy" in _error(single)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    assert "not a readable .npz file" in _error(junk)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((4, 2)), y=Y4)
    real_open = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:  # as root chmod 000 would not stop the read
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    assert "could not be read" in _error(path) and "Permission denied" in _error(path)


def test_path_whose_metadata_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "locked" / "d.npz"
    real_stat = Path.stat

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:  # what stat says below a folder without search permission
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", deny)
    assert "could not be read" in _error(path) and "Permission denied" in _error(path)
    a_file = _npz(tmp_path / "file.npz", x=np.zeros((4, 2)), y=Y4)
    assert "does not exist" in _error(a_file / "below-a-file.npz")  # ENOTDIR


def test_more_than_the_machine_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((4, 2)), y=Y4)
    # x: 64 bytes, its float32 copy 32, y 32: 128 in all.
    monkeypatch.setattr(npz, "_physical_memory", lambda: 127)
    msg = _error(path)
    assert "needs about 128 bytes of memory" in msg and "this machine's 127 bytes" in msg
    monkeypatch.setattr(npz, "_physical_memory", lambda: 128)
    assert len(_load(path).train) == 3


def test_allocation_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((4, 2)), y=Y4)

    def no_memory(*args: Any, **kwargs: Any) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(np.lib.format, "read_array", no_memory)
    msg = _error(path)
    assert "array 'y' needs 32 bytes of memory" in msg and "more than this machine" in msg


def test_huge_header_is_refused_before_allocating(tmp_path: Path) -> None:
    member = _npy_claiming((10**12, 10**6), "<f4", b"\0" * 64)
    path = _zip(tmp_path / "huge.npz", {"x.npy": member, "y.npy": _npy(Y4)})
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = _error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0
    assert peak < 16 * 2**20
    assert "header claims shape (1000000000000, 1000000)" in msg and "64 bytes" in msg
    assert "corrupt or truncated" in msg


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_header_larger_than_member_allocates_nothing(
    tmp_path: Path, version: int, compress: bool
) -> None:
    # 2 GB is a size malloc grants at once, so a reader that trusted the header would show it
    # in tracemalloc's peak; the 4 examples of 3 float32 values it really holds are 48 bytes.
    x = np.zeros((4, 3), np.float32).tobytes()
    member = _npy_claiming((2**27, 4), "<f4", x, version)
    path = _zip(tmp_path / "d.npz", {"x.npy": member, "y.npy": _npy(Y4)}, compress=compress)
    tracemalloc.start()
    try:
        msg = _error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    assert "(134217728, 4)" in msg and "48 bytes" in msg


def test_compressed_and_unusual_layouts_load(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(24, dtype=">f8").reshape(6, 4))  # big-endian, column-major
    y = np.array([0, 1, 2, 0, 1, 2], dtype=">u2")
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=x, y=y)
    ds = _load(path, ", eval_fraction: 0.5")
    got = Counter(
        (tuple(r), int(label))
        for split in (ds.train, ds.eval)
        for r, label in zip(split.x, split.y, strict=True)
    )
    assert got == Counter((tuple(r), int(label)) for r, label in zip(x, y, strict=True))
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
    assert ds.num_classes == 3


# ------------------------------------------------------------------------------------ labels
def test_label_beyond_int32_is_not_wrapped(tmp_path: Path) -> None:
    y = np.array([0, 1, 2**32 + 3, 1])  # astype(int32) would make it class 3
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=y)
    assert "label 4294967299 at row 2 is too large" in msg and "'y'" in msg


def test_unsigned_labels(tmp_path: Path) -> None:
    ds = _load(_npz(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.array([0, 1, 2, 1, 0], np.uint8)))
    assert ds.num_classes == 3 and ds.train.y.dtype == np.int32
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 2**63, 1, 0], np.uint64))
    assert f"label {2**63} at row 1 is too large" in msg


def test_bool_labels(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([True, False, True, False]))
    assert "booleans" in msg and "astype(np.int64)" in msg


def test_float_labels(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 1.0, 0.0]))
    assert "whole numbers" in msg and "astype(np.int64)" in msg
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 0.5, np.nan]))
    assert "row 2 holds 0.5" in msg
    assert "complex" in _bad(tmp_path, x=np.zeros((4, 2)), y=Y4 + 0j)


def test_negative_label_names_its_row(tmp_path: Path) -> None:
    msg = _bad(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 1, 1, -7]))
    assert "must be >= 0, found -7 at row 3" in msg


def test_eval_label_never_trained_on(tmp_path: Path) -> None:
    train = _npz(tmp_path / "t.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 2, 1]))
    ev = _npz(tmp_path / "e.npz", x=np.zeros((3, 2)), y=np.array([1, 3, 4]))
    msg = _error(train, f", eval_path: '{ev}'", field="eval_path", named=ev)
    assert "eval label 3 at row 1" in msg and "largest 2" in msg and str(train) in msg


def test_eval_file_labels_are_checked_too(tmp_path: Path) -> None:
    train = _npz(tmp_path / "t.npz", x=np.zeros((4, 2)), y=Y4)
    ev = _npz(tmp_path / "e.npz", x=np.zeros((2, 2)), y=np.array([0, -1]))
    msg = _error(train, f", eval_path: '{ev}'", field="eval_path", named=ev)
    assert "found -1 at row 1" in msg


def test_check_labels() -> None:
    y = np.array([0, 2, 9, 10, 1], np.int64)
    with pytest.raises(FieldError) as info:
        check_labels(y, 10, "d.npz, array 'y'")
    assert info.value.path == ("data", "path")
    assert "d.npz, array 'y': label 10 at row 3" in str(info.value)
    assert "0 .. 9" in str(info.value)
    with pytest.raises(FieldError) as info:
        check_labels(y, 10, "e.npz", field=("data", "eval_path"))
    assert info.value.path == ("data", "eval_path")
    out = check_labels(y, 11, "d.npz")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, y)


# ------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    ("x", "word"),
    [
        (np.ones((4, 2), np.complex64), "complex numbers"),
        (np.array([["a", "b"]] * 4), "strings"),
        (np.array([[b"a"]] * 4), "byte strings"),
        (np.array([["2024-01-01"]] * 4, dtype="datetime64[D]"), "dates"),
        (np.ones((4, 1), dtype="timedelta64[s]"), "time spans"),
        (np.zeros((4, 2), dtype=[("a", "<f4"), ("b", "<i4")]), "structured records"),
    ],
    ids=["complex", "str", "bytes", "datetime", "timedelta", "structured"],
)
def test_non_real_inputs(tmp_path: Path, x: np.ndarray, word: str) -> None:
    msg = _bad(tmp_path, x=x, y=Y4)
    assert "must be numeric" in msg and word in msg and "'x'" in msg


def test_nan_in_inputs_names_row_and_column(tmp_path: Path) -> None:
    x = np.zeros((6, 3))
    x[4, 2] = np.nan
    x[5, 0] = np.inf
    msg = _bad(tmp_path, x=x, y=np.arange(6) % 2)
    assert "'x' at row 4, column 2 is nan" in msg and "finite" in msg


def test_inf_in_image_inputs_names_position(tmp_path: Path) -> None:
    x = np.zeros((4, 2, 3), np.float16)
    x[1, 1, 0] = -np.inf
    assert "row 1, position (1, 0) is -inf" in _bad(tmp_path, x=x, y=Y4)


def test_value_too_large_for_float32(tmp_path: Path) -> None:
    x = np.zeros((4, 2))
    x[3, 1] = 1e300
    assert "row 3, column 1 is 1e+300, too large for float32" in _bad(tmp_path, x=x, y=Y4)


def test_eval_file_with_other_dtype_or_shape(tmp_path: Path) -> None:
    train = _npz(tmp_path / "t.npz", x=np.zeros((4, 3), np.uint8), y=Y4)
    ev = _npz(tmp_path / "e.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    msg = _error(train, f", eval_path: '{ev}'", field="eval_path", named=ev)
    assert "eval inputs are float64" in msg and "are uint8" in msg and str(train) in msg
    ev = _npz(tmp_path / "e.npz", x=np.zeros((2, 4), np.uint8), y=np.array([0, 1]))
    msg = _error(train, f", eval_path: '{ev}'", field="eval_path", named=ev)
    assert "(4,)" in msg and "(3,)" in msg
    ev = _npz(tmp_path / "e.npz", x=np.full((2, 3), np.nan), y=np.array([0, 1]))
    train = _npz(tmp_path / "t.npz", x=np.zeros((4, 3)), y=Y4)
    msg = _error(train, f", eval_path: '{ev}'", field="eval_path", named=ev)
    assert "row 0, column 0 is nan" in msg


# -------------------------------------------------------------------------------- text tokens
def _text(path: Path, extra: str = "") -> Dataset:
    return load_tokens(_cfg(f"{{source: tokens, kind: text, path: '{path}'{extra}}}"))


def _text_error(path: Path, extra: str = "") -> str:
    with pytest.raises(FieldError) as info:
        _text(path, extra)
    assert info.value.path == ("data", "path")
    assert str(path) in str(info.value)
    return str(info.value)


def test_text_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    msg = _text_error(path, ", seq_len: 8")
    assert "is empty" in msg and f"at least {min_text_bytes(8, 0.1)} bytes" in msg


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.93])
def test_text_shortest_file_is_exact(tmp_path: Path, fraction: float) -> None:
    extra = f", seq_len: 8, eval_fraction: {fraction}"
    need = min_text_bytes(8, fraction)
    path = tmp_path / "t.txt"
    path.write_bytes(b"a" * (need - 1))
    msg = _text_error(path, extra)
    assert f"has {need - 1} bytes" in msg and f"needs at least {need} bytes" in msg
    path.write_bytes(b"a" * need)
    ds = _text(path, extra)
    assert len(ds.train) >= 1 and len(ds.eval) >= 1


def test_text_directory_missing_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "is a directory" in _text_error(tmp_path)
    assert "does not exist" in _text_error(tmp_path / "nope.txt")
    path = tmp_path / "t.txt"
    path.write_bytes(b"x" * 4096)

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    msg = _text_error(path)
    assert "could not be read" in msg and "Permission denied" in msg


# ------------------------------------------------------------------------------------- fuzzing
FUZZ = settings(
    max_examples=int(os.environ.get("ACCELCTL_FUZZ_EXAMPLES", "40")),
    # The CI run sees the same examples every time; a long run explores.
    derandomize="ACCELCTL_FUZZ_EXAMPLES" not in os.environ,
    database=None,  # no .hypothesis folder in the checkout
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
X_DTYPES = ["uint8", "int8", "int64", "uint64", "float16", "float32", "float64", "bool", "c8"]
Y_DTYPES = ["int8", "int32", "int64", "uint8", "uint64", "bool", "float32", "float64"]
EVAL_FRACTION = 0.25
LIMIT = 2**31 - 1


@st.composite
def _arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    # Weighted towards well-formed files so that loading, not only refusing, is exercised.
    n = draw(st.integers(0, 6))
    dims = draw(st.lists(st.sampled_from([1, 2, 3, 0]), max_size=2))
    good = (n, 2, *dims)
    x_shape = draw(st.sampled_from([good, good, good, good, (n, *dims), (n,), (n + 1, *dims)]))
    y_shape = draw(st.sampled_from([(n,)] * 6 + [(n, 1)]))
    x_dtype = np.dtype(draw(st.sampled_from(X_DTYPES)))
    finite = x_dtype.kind in "fc" and draw(st.booleans())
    elements = {"allow_nan": False, "allow_infinity": False} if finite else None
    x = draw(hnp.arrays(x_dtype, x_shape, elements=elements))
    y_dtype = np.dtype(draw(st.sampled_from(Y_DTYPES)))
    if y_dtype.kind in "iu" and draw(st.booleans()):
        y = draw(hnp.arrays(y_dtype, y_shape, elements=st.integers(0, 5)))
    else:
        y = draw(hnp.arrays(y_dtype, y_shape))  # the whole range: negative, huge, NaN
    return x, y


def _loadable(x: np.ndarray, y: np.ndarray) -> bool:
    """What the reader must accept: the independent statement of the rules."""
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or 0 in x.shape[1:]:
        return False
    if x.dtype.kind not in "buif" or y.dtype.kind not in "iu":
        return False
    n_eval = max(1, round(len(y) * EVAL_FRACTION))
    if len(y) - n_eval < 1:
        return False
    if any(int(v) < 0 or int(v) >= LIMIT for v in y):
        return False
    with np.errstate(over="ignore"):
        return x.dtype == np.uint8 or bool(np.isfinite(x.astype(np.float32)).all())


def _rows(x: np.ndarray, y: np.ndarray) -> Counter[tuple[bytes, int]]:
    return Counter((r.tobytes(), int(label)) for r, label in zip(x, y, strict=True))


def _check_outcome(path: Path, x: np.ndarray, y: np.ndarray) -> Dataset | None:
    """Load `path`: a sane Dataset holding exactly the rows (x, y), or a UserError naming it."""
    try:
        ds = _load(path, f", eval_fraction: {EVAL_FRACTION}")
    except UserError as e:
        assert str(path) in str(e)
        # --hypothesis-show-statistics: which refusals the examples reached.
        event(" ".join(str(e).removeprefix(f"data.path: {path}").split()[:4]))
        return None
    event("loaded")
    splits = (ds.train, ds.eval)
    for s in splits:
        assert s.x.dtype in (np.uint8, np.float32)
        assert s.x.dtype == np.uint8 or np.isfinite(s.x).all()
        assert s.y.dtype == np.int32 and s.y.ndim == 1 and len(s.y) == len(s.x) > 0
        assert s.y.min() >= 0 and s.y.max() < ds.num_classes
    want_x = x if x.dtype == np.uint8 else x.astype(np.float32)
    got = sum((_rows(s.x, s.y) for s in splits), Counter())
    assert got == _rows(want_x, y)  # every row, with its own label, nothing else
    return ds


@FUZZ
@given(arrays=_arrays(), compress=st.booleans())
def test_fuzz_npz_contents(arrays: tuple[np.ndarray, np.ndarray], compress: bool) -> None:
    x, y = arrays
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.npz"
        (np.savez_compressed if compress else np.savez)(path, x=x, y=y)
        loaded = _check_outcome(path, x, y)
    assert (loaded is not None) == _loadable(x, y)


@st.composite
def _corruption(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    ops = st.tuples(
        st.sampled_from(["flip", "truncate", "set"]), st.integers(0, size - 1), st.integers(1, 255)
    )
    return draw(st.lists(ops, min_size=1, max_size=4))


@FUZZ
@given(data=st.data(), compress=st.booleans(), n=st.integers(4, 12))
def test_fuzz_corrupt_npz(data: st.DataObject, compress: bool, n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.integers(0, 3, n)
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, x=x, y=y)
    raw = bytearray(buf.getvalue())
    for op, at, value in data.draw(_corruption(len(raw))):
        if op == "truncate":
            del raw[at:]
        elif at < len(raw):
            raw[at] = raw[at] ^ value if op == "flip" else value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.npz"
        path.write_bytes(bytes(raw))
        # The zip's CRC-32 covers every array byte, so whatever still loads is the original.
        _check_outcome(path, x, y)
