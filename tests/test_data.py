"""Tests for accelctl.data: sources, host batching, placement on the 8 fake devices."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from accelctl import config, data
from accelctl.data import Dataset, Split, eval_batches, make_put_fn, train_batches
from accelctl.errors import UserError


def _data(text: str, overrides: tuple[str, ...] = ()) -> Dataset:
    return data.build(config.load_text(f"data: {text}", "x.yaml", overrides).data)


def _row_keys(split: Split) -> Counter[bytes]:
    """Multiset of (image bytes, label) hashes: duplicates in the data are counted, not merged."""
    return Counter(
        hashlib.sha1(x.tobytes() + int(y).to_bytes(4, "little")).digest()
        for x, y in zip(split.x, split.y, strict=True)
    )


# ------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits() -> Dataset:
    return _data("{source: digits}")


def test_digits_shapes_dtypes_and_values(digits: Dataset) -> None:
    for split in (digits.train, digits.eval):
        assert split.x.dtype == np.uint8
        assert split.x.shape[1:] == (8, 8, 1)
        assert split.y.dtype == np.int32
        assert split.y.shape == (len(split),)
        assert split.x.min() >= 0 and split.x.max() <= 16
        assert set(np.unique(split.y)) <= set(range(10))
    assert digits.train.x.max() == 16  # the full range is present, not rescaled
    assert digits.x_scale == pytest.approx(1 / 16)
    assert digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)
    assert len(digits.train) + len(digits.eval) == 1797
    assert len(digits.eval) == round(1797 * 0.2)


def test_digits_split_is_a_partition_of_the_whole_set(digits: Dataset) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = Split(bunch.images.astype(np.uint8)[..., None], bunch.target.astype(np.int32))
    # train + eval == all examples (as multisets), so no example is in both or missing.
    assert _row_keys(digits.train) + _row_keys(digits.eval) == _row_keys(full)


def test_digits_eval_fraction_changes_split_size() -> None:
    ds = _data("{source: digits, eval_fraction: 0.5}")
    assert len(ds.eval) == round(1797 * 0.5)
    assert len(ds.train) == 1797 - len(ds.eval)


def test_digits_split_deterministic_per_seed(digits: Dataset) -> None:
    again = _data("{source: digits, split_seed: 0}")
    np.testing.assert_array_equal(again.eval.x, digits.eval.x)
    np.testing.assert_array_equal(again.eval.y, digits.eval.y)
    np.testing.assert_array_equal(again.train.y, digits.train.y)
    other = _data("{source: digits, split_seed: 1}")
    assert len(other.eval) == len(digits.eval)
    assert _row_keys(other.eval) != _row_keys(digits.eval)


# --------------------------------------------------------------------------------- synthetic
SYNTH = "{source: synthetic, shape: [5, 3, 2], num_train: 64, num_eval: 24, num_classes: 3}"


@pytest.mark.parametrize(
    ("dtype", "scale"), [("uint8", 1 / 255), ("float32", None)], ids=["uint8", "float32"]
)
def test_synthetic_shapes_and_dtypes(dtype: str, scale: float | None) -> None:
    ds = _data(SYNTH, (f"data.dtype={dtype}",))
    assert ds.train.x.shape == (64, 5, 3, 2)
    assert ds.eval.x.shape == (24, 5, 3, 2)
    assert ds.train.x.dtype == np.dtype(dtype)
    assert ds.eval.x.dtype == np.dtype(dtype)
    assert ds.train.y.shape == (64,) and ds.eval.y.shape == (24,)
    assert ds.train.y.dtype == np.int32
    assert ds.num_classes == 3
    assert ds.input_shape == (5, 3, 2)
    if scale is None:
        assert ds.x_scale is None
    else:
        assert ds.x_scale == pytest.approx(scale)
    for split in (ds.train, ds.eval):
        assert split.y.min() >= 0 and split.y.max() < 3
    # A random linear teacher over many inputs uses more than one class.
    assert len(np.unique(ds.train.y)) > 1


def test_synthetic_deterministic_with_seed() -> None:
    a, b = _data(SYNTH), _data(SYNTH)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    np.testing.assert_array_equal(a.eval.x, b.eval.x)
    c = _data(SYNTH, ("data.seed=1",))
    assert not np.array_equal(a.train.x, c.train.x)


def test_synthetic_train_and_eval_differ() -> None:
    ds = _data(SYNTH)
    assert not (_row_keys(ds.train) & _row_keys(ds.eval))


# --------------------------------------------------------------------------------------- npz
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _npz_cfg(path: Path, extra: str = "") -> str:
    return f"{{source: npz, path: '{path}'{extra}}}"


def test_npz_uint8_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 4, 3), dtype=np.uint8)
    y = np.arange(20, dtype=np.int64) % 4
    path = _npz(tmp_path / "mine.npz", x=x, y=y)
    ds = _data(_npz_cfg(path, ", eval_fraction: 0.25"))
    assert ds.name == "mine"
    assert ds.x_scale == pytest.approx(1 / 255)
    assert ds.train.x.dtype == np.uint8 and ds.eval.x.dtype == np.uint8
    assert ds.train.y.dtype == np.int32 and ds.eval.y.dtype == np.int32
    assert ds.input_shape == (4, 3)
    assert ds.num_classes == 4
    assert len(ds.eval) == 5 and len(ds.train) == 15
    assert _row_keys(ds.train) + _row_keys(ds.eval) == _row_keys(Split(x, y.astype(np.int32)))


def test_npz_float64_becomes_float32(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 30, dtype=np.float64).reshape(10, 3)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 5])
    path = _npz(tmp_path / "f.npz", inputs=x, labels=y)
    ds = _data(_npz_cfg(path, ", x_key: inputs, y_key: labels"))
    assert ds.x_scale is None
    assert ds.train.x.dtype == np.float32 and ds.eval.x.dtype == np.float32
    assert ds.num_classes == 6  # max label + 1
    got = np.concatenate([ds.train.x, ds.eval.x])
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(x, axis=0).astype(np.float32))


def test_npz_eval_path(tmp_path: Path) -> None:
    tx, ty = np.ones((8, 2, 2), np.uint8), np.array([0, 2] * 4)
    ex, ey = np.full((3, 2, 2), 7, np.uint8), np.array([1, 0, 1])
    train = _npz(tmp_path / "train.npz", x=tx, y=ty)
    ev = _npz(tmp_path / "eval.npz", x=ex, y=ey)
    ds = _data(_npz_cfg(train, f", eval_path: '{ev}'"))
    np.testing.assert_array_equal(ds.train.x, tx)
    np.testing.assert_array_equal(ds.train.y, ty)
    np.testing.assert_array_equal(ds.eval.x, ex)
    np.testing.assert_array_equal(ds.eval.y, ey)
    # Class 1 is only in the eval file; below the largest training label (2), it is allowed.
    assert ds.num_classes == 3
    assert ds.x_scale == pytest.approx(1 / 255)


def test_npz_eval_path_dtype_matches_train(tmp_path: Path) -> None:
    train = _npz(tmp_path / "t.npz", x=np.zeros((6, 3), np.uint8), y=np.arange(6) % 2)
    ev = _npz(tmp_path / "e.npz", x=np.full((2, 3), 0.5), y=np.array([0, 1]))
    try:
        ds = _data(_npz_cfg(train, f", eval_path: '{ev}'"))
    except UserError:
        return  # refusing the mix is a fine fix too
    assert ds.eval.x.dtype == ds.train.x.dtype


def _npz_error(tmp_path: Path, match: str, extra: str = "", **arrays: np.ndarray) -> str:
    path = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=match) as info:
        _data(_npz_cfg(path, extra))
    return str(info.value)


def test_npz_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(UserError, match="does not exist") as info:
        _data(_npz_cfg(missing))
    assert "data.path" in str(info.value) and "nope.npz" in str(info.value)


def test_npz_missing_eval_file(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.arange(4))
    with pytest.raises(UserError, match=r"data\.eval_path: .*does not exist"):
        _data(_npz_cfg(path, f", eval_path: '{tmp_path / 'gone.npz'}'"))


def test_npz_missing_key_lists_keys(tmp_path: Path) -> None:
    msg = _npz_error(
        tmp_path, "has no array 'x'", images=np.zeros((4, 2)), y=np.arange(4), extra=""
    )
    assert "images" in msg and "y" in msg and "x_key" in msg
    msg = _npz_error(
        tmp_path,
        "has no array 'target'",
        x=np.zeros((4, 2)),
        y=np.arange(4),
        extra=", y_key: target",
    )
    assert "it has: x, y" in msg


def test_npz_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"\x00\x01this is not a zip file at all" * 10)
    with pytest.raises(UserError, match="not a readable .npz file"):
        _data(_npz_cfg(path))


def test_npz_truncated_zip(tmp_path: Path) -> None:
    path = _npz(tmp_path / "t.npz", x=np.zeros((50, 20)), y=np.arange(50))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable .npz file"):
        _data(_npz_cfg(path))


def test_npz_given_an_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "arr.npy"
    np.save(path, np.zeros((4, 2)))
    with pytest.raises(UserError):
        _data(_npz_cfg(path))


def test_npz_length_mismatch(tmp_path: Path) -> None:
    msg = _npz_error(tmp_path, "expected x of shape", x=np.zeros((5, 2)), y=np.arange(4))
    assert "(5, 2)" in msg and "(4,)" in msg


def test_npz_flat_inputs_rejected(tmp_path: Path) -> None:
    _npz_error(tmp_path, "expected x of shape", x=np.zeros(4), y=np.arange(4))


def test_npz_non_integer_labels(tmp_path: Path) -> None:
    _npz_error(tmp_path, "must be integers.*float", x=np.zeros((4, 2)), y=np.array([0.0, 1, 2, 3]))


def test_npz_negative_labels(tmp_path: Path) -> None:
    _npz_error(tmp_path, "must be >= 0, found -3", x=np.zeros((4, 2)), y=np.array([0, 1, -3, 2]))


def test_npz_non_numeric_inputs(tmp_path: Path) -> None:
    _npz_error(tmp_path, "must be numeric", x=np.array([["a", "b"]] * 4), y=np.arange(4))


def test_npz_empty_arrays(tmp_path: Path) -> None:
    path = _npz(tmp_path / "empty.npz", x=np.zeros((0, 2), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(UserError):
        _data(_npz_cfg(path))


def test_npz_eval_path_shape_mismatch(tmp_path: Path) -> None:
    train = _npz(tmp_path / "t.npz", x=np.zeros((6, 4, 4)), y=np.arange(6))
    ev = _npz(tmp_path / "e.npz", x=np.zeros((2, 4, 5)), y=np.arange(2))
    with pytest.raises(UserError, match=r"data\.eval_path") as info:
        _data(_npz_cfg(train, f", eval_path: '{ev}'"))
    assert "(4, 5)" in str(info.value) and "(4, 4)" in str(info.value)


# ---------------------------------------------------------------------------------- batching
N = 50


def _ids_split(n: int = N) -> Split:
    """Example i has x == [i, i] so a batch tells which examples it holds."""
    ids = np.arange(n, dtype=np.int64)
    return Split(np.stack([ids, ids], axis=1), (ids % 7).astype(np.int32))


def _ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["x"][:, 0]


def _run(split: Split, bs: int, start: int, end: int, seed: int = 0, **kw: int) -> list:
    return list(train_batches(split, bs, seed=seed, start_step=start, num_steps=end, **kw))


def test_train_batches_shapes_and_labels() -> None:
    split = _ids_split()
    batches = _run(split, 8, 0, 10)
    assert len(batches) == 10
    for b in batches:
        assert set(b) == {"x", "y"}
        assert b["x"].shape == (8, 2) and b["y"].shape == (8,)
        assert b["y"].dtype == np.int32
        np.testing.assert_array_equal(b["y"], _ids(b) % 7)  # x and y stay paired


def test_train_batches_deterministic_per_seed() -> None:
    split = _ids_split()
    a = [_ids(b) for b in _run(split, 8, 0, 12)]
    b = [_ids(b) for b in _run(split, 8, 0, 12)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    c = [_ids(b) for b in _run(split, 8, 0, 12, seed=1)]
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_train_batches_epochs_distinct_and_reshuffled() -> None:
    split = _ids_split()
    spe = N // 8  # 6 steps per epoch; the last 2 examples of each epoch are dropped
    ids = np.stack([_ids(b) for b in _run(split, 8, 0, 3 * spe)])
    epochs = ids.reshape(3, spe * 8)
    for e in epochs:
        assert len(np.unique(e)) == spe * 8  # no example twice within an epoch
        assert e.min() >= 0 and e.max() < N
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # Every example is used over a few epochs (the dropped remainder changes each epoch).
    assert set(np.unique(epochs)) == set(range(N))


@pytest.mark.parametrize("k", [1, 5, 6, 13])
def test_train_batches_resume_without_replay(k: int) -> None:
    split = _ids_split()
    full = _run(split, 8, 0, 20)
    tail = _run(split, 8, k, 20)
    assert len(tail) == 20 - k
    for a, b in zip(full[k:], tail, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


def test_train_batches_process_slices_cover_global_batch() -> None:
    split = _ids_split()
    whole = _run(split, 8, 0, 9)
    p0 = _run(split, 8, 0, 9, process_index=0, process_count=2)
    p1 = _run(split, 8, 0, 9, process_index=1, process_count=2)
    for w, a, b in zip(whole, p0, p1, strict=True):
        assert a["x"].shape == (4, 2) and b["x"].shape == (4, 2)
        both = np.concatenate([_ids(a), _ids(b)])
        # The processes' parts, in process order, are the single-process batch, row for row.
        np.testing.assert_array_equal(both, _ids(w))


def _eval_ids(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([_ids(b)[b["mask"] == 1] for b in batches])


def test_eval_batches_cover_each_example_once_with_padding() -> None:
    split = _ids_split()
    batches = list(eval_batches(split, 8))
    assert len(batches) == 7  # ceil(50 / 8)
    for b in batches:
        assert b["x"].shape == (8, 2) and b["y"].shape == (8,) and b["mask"].shape == (8,)
        assert b["mask"].dtype == np.float32
        assert b["y"].dtype == split.y.dtype
    np.testing.assert_array_equal(_eval_ids(batches), np.arange(N))
    last = batches[-1]
    np.testing.assert_array_equal(last["mask"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(_ids(last)[:2], [48, 49])
    np.testing.assert_array_equal(last["y"][2:], 0)
    for b in batches[:-1]:
        assert b["mask"].min() == 1
        np.testing.assert_array_equal(b["y"], _ids(b) % 7)


def test_eval_batches_exact_multiple_has_no_padding_batch() -> None:
    batches = list(eval_batches(_ids_split(48), 8))
    assert len(batches) == 6
    assert all(b["mask"].min() == 1 for b in batches)


def test_eval_batches_process_slices() -> None:
    split = _ids_split()
    p0 = list(eval_batches(split, 8, process_index=0, process_count=2))
    p1 = list(eval_batches(split, 8, process_index=1, process_count=2))
    assert len(p0) == len(p1) == 7  # every process runs the same number of steps
    assert all(b["x"].shape == (4, 2) and b["mask"].shape == (4,) for b in p0 + p1)
    got = np.concatenate([_eval_ids(p0), _eval_ids(p1)])
    np.testing.assert_array_equal(np.sort(got), np.arange(N))
    # The last global batch holds 48, 49 on process 0 and only padding on process 1.
    np.testing.assert_array_equal(p0[-1]["mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(p1[-1]["mask"], [0, 0, 0, 0])


# --------------------------------------------------------------------------------- placement
def test_make_put_fn_shards_the_batch_over_8_devices() -> None:
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(0)
    host = {
        "x": rng.integers(0, 17, size=(16, 8, 8, 1), dtype=np.uint8),
        "y": rng.integers(0, 10, size=(16,), dtype=np.int32),
        "mask": np.ones(16, np.float32),
    }
    out = make_put_fn(sharding)(host)
    assert set(out) == set(host)
    for key, arr in out.items():
        assert isinstance(arr, jax.Array)
        assert arr.shape == host[key].shape
        assert arr.dtype == host[key].dtype
        assert arr.sharding.is_equivalent_to(sharding, arr.ndim)
        shards = arr.addressable_shards
        assert len(shards) == 8
        assert {s.device for s in shards} == set(jax.devices())
        for s in shards:
            assert s.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(s.data), host[key][s.index])
        np.testing.assert_array_equal(np.asarray(arr), host[key])
