"""The device cache (gather on the devices) against the host path, cache planning, data position."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.data import (
    DataPosition,
    DeviceFeed,
    Split,
    epoch_batch_table,
    make_gather,
    place_split,
    plan_cache,
    train_batches,
)
from accelctl.data import device_cache as device_cache_module
from accelctl.errors import UserError
from accelctl.train import train


def _mesh(k: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:k]).reshape(k, 1), ("data", "model"))


def _uint8_split(n: int, shape: tuple[int, ...] = (3, 2), seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return Split(x, rng.integers(0, 10, size=n, dtype=np.int32))


def _assert_batch_equal(got: dict[str, jax.Array], want: dict[str, np.ndarray]) -> None:
    for key in ("x", "y"):
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(np.asarray(got[key]), want[key])


# ------------------------------------------------------------------------------------ gather
@pytest.mark.parametrize("devices", [8, 1])
def test_gather_equals_take_with_padding(devices: int) -> None:
    mesh = _mesh(devices)
    split = _uint8_split(50)  # not a multiple of 8: padded to 56 on 8 devices
    cache = place_split(split, mesh)
    assert cache["x"].shape[0] == -(-50 // devices) * devices
    gather = jax.jit(make_gather(mesh))
    rng = np.random.default_rng(1)
    rows = [rng.choice(50, size=16, replace=False) for _ in range(4)]
    rows.append(np.array([49, 0, 48, 7, 8, 41, 42, 49, 1, 2, 3, 4, 5, 6, 47, 46]))  # repeats ok
    want_sharding = NamedSharding(mesh, P("data"))
    for idx in rows:
        out = gather(cache, idx.astype(np.int32))
        x, y = split.take(idx)
        _assert_batch_equal(out, {"x": x, "y": y})
        for a in out.values():
            assert a.sharding.is_equivalent_to(want_sharding, a.ndim)
            assert len(a.sharding.device_set) == devices


# ---------------------------------------------------------------------- device vs host batches
def test_device_feed_gathers_the_host_batches_across_epochs() -> None:
    mesh = _mesh(8)
    split = _uint8_split(100, (4, 4, 1), seed=2)
    batch, seed, start, end = 16, 3, 4, 15  # 6 steps per epoch: starts mid-epoch, 2 boundaries
    spe = len(split) // batch
    gather = jax.jit(make_gather(mesh))
    feed = DeviceFeed(
        place_split(split, mesh),
        mesh,
        num_examples=len(split),
        batch_size=batch,
        seed=seed,
        start_step=start,
        num_steps=end,
    )
    host = train_batches(split, batch, seed=seed, start_step=start, num_steps=end)
    tables = []
    with feed:
        for step in range(start, end):
            item = next(feed)
            assert item["idx"].shape == (spe, batch)
            tables.append(item["idx"])
            _assert_batch_equal(gather(item["cache"], item["idx"][step % spe]), next(host))
        with pytest.raises(StopIteration):
            next(feed)
    assert next(host, None) is None
    assert feed.items == end - start
    # One table per epoch: the same object within an epoch, a new one at each boundary.
    epochs = [step // spe for step in range(start, end)]
    assert len({id(t) for t in tables}) == len(set(epochs)) == 3


# ---------------------------------------------------------------------------- end to end
BASE = [
    "data.num_train=96",  # 3 steps per epoch at batch 32: 10 steps cross 3 boundaries
    "train.steps=10",
    "train.log_every=1",
    "train.eval_every=10",
]
AUGMENT = "data.augment={crop_padding: 1, flip: true}"


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, lines) if e["event"] == "train"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """trained(tiny_config, *overrides) -> (summary, losses); each distinct run trains once.

    The tests below share runs (in file order each trains at most two), to stay fast.
    """
    done: dict[tuple[str, ...], tuple[dict[str, Any], np.ndarray]] = {}

    def get(tiny_config: Any, *overrides: str) -> tuple[dict[str, Any], np.ndarray]:
        if overrides not in done:
            run_dir = tmp_path_factory.mktemp("run")
            summary = train(tiny_config([*BASE, *overrides]), run_dir=run_dir, quiet=True)
            steps, values = zip(*_losses(run_dir), strict=True)
            assert list(steps) == list(range(1, 11))
            done[overrides] = summary, np.array(values)
        return done[overrides]

    return get


def test_host_and_device_cache_train_identically(tiny_config, trained) -> None:
    host, host_losses = trained(tiny_config, "data.cache=host")
    dev, dev_losses = trained(tiny_config, "data.cache=device")
    assert host["data_cache"] == "host" and dev["data_cache"] == "device"
    np.testing.assert_allclose(host_losses, dev_losses, rtol=1e-6)
    np.testing.assert_allclose(host["final_eval"]["loss"], dev["final_eval"]["loss"], rtol=1e-6)


def test_augmentation_changes_the_losses(tiny_config, trained) -> None:
    _, plain = trained(tiny_config, "data.cache=device")
    _, augmented = trained(tiny_config, "data.cache=device", AUGMENT)
    assert not np.allclose(plain, augmented, rtol=1e-4)


def test_host_and_device_cache_augment_identically(tiny_config, trained) -> None:
    host, host_losses = trained(tiny_config, "data.cache=host", AUGMENT)
    dev, dev_losses = trained(tiny_config, "data.cache=device", AUGMENT)
    assert host["data_cache"] == "host" and dev["data_cache"] == "device"
    np.testing.assert_allclose(host_losses, dev_losses, rtol=1e-6)


def test_augmented_run_is_the_same_on_one_and_eight_devices(tiny_config, trained) -> None:
    eight, l8 = trained(tiny_config, "data.cache=device", AUGMENT)
    one, l1 = trained(tiny_config, "data.cache=device", AUGMENT, "parallel.num_devices=1")
    assert one["devices"] == 1 and eight["devices"] == 8
    np.testing.assert_allclose(l1, l8, rtol=2e-5)


# ------------------------------------------------------------------------------ plan_cache
class _Streamed:
    """A split that is not in memory (like tfds with cache: none): only its size is known."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_plan_cache_auto_picks_the_device_for_a_small_split() -> None:
    mode, reason = plan_cache("auto", _uint8_split(64), _mesh(8))
    assert mode == "device" and "fits" in reason


@pytest.mark.parametrize("mode", ["device", "host", "none"])
def test_plan_cache_explicit_modes_pass_through(mode: str) -> None:
    assert plan_cache(mode, _uint8_split(64), _mesh(8)) == (mode, "set in the config")


def test_plan_cache_auto_falls_back_when_the_device_is_too_small(monkeypatch) -> None:
    monkeypatch.setattr(device_cache_module, "device_budget_bytes", lambda mesh: 100)
    mode, reason = plan_cache("auto", _uint8_split(64), _mesh(8))
    assert mode == "host" and "exceeds" in reason
    # A streamed split larger than half the free host memory is not decoded at all.
    monkeypatch.setattr(device_cache_module, "available_host_bytes", lambda: 1000)
    assert plan_cache("auto", _Streamed(400), _mesh(8))[0] == "host"
    mode, reason = plan_cache("auto", _Streamed(10_000), _mesh(8))
    assert mode == "none" and "host memory" in reason
    # An in-memory split is already decoded: host, whatever its size.
    assert plan_cache("auto", _uint8_split(64), _mesh(8))[0] == "host"


# ---------------------------------------------------------------------------- DataPosition
def test_data_position_at() -> None:
    pos = DataPosition.at(13, steps_per_epoch=5, seed=7)
    assert (pos.step, pos.epoch, pos.batch_in_epoch, pos.seed) == (13, 2, 3, 7)
    assert DataPosition.at(0, steps_per_epoch=5, seed=0).epoch == 0
    assert DataPosition.at(10, steps_per_epoch=5, seed=0).batch_in_epoch == 0


def test_data_position_round_trips_through_json() -> None:
    pos = DataPosition.at(13, steps_per_epoch=5, seed=7)
    stored = json.loads(json.dumps(pos.to_dict()))
    assert stored == {"step": 13, "epoch": 2, "batch_in_epoch": 3, "seed": 7}
    assert DataPosition.from_dict(stored, steps_per_epoch=5) == pos


def test_data_position_rejects_a_changed_epoch_size() -> None:
    stored = DataPosition.at(13, steps_per_epoch=5, seed=7).to_dict()
    with pytest.raises(UserError, match="does not match 6 steps per epoch") as info:
        DataPosition.from_dict(stored, steps_per_epoch=6)
    assert "batch size" in str(info.value)


@pytest.mark.parametrize(
    "stored",
    [
        {"step": 13, "epoch": 2, "seed": 7},  # batch_in_epoch missing
        {"step": "x", "epoch": 2, "batch_in_epoch": 3, "seed": 7},
        {"step": None, "epoch": 2, "batch_in_epoch": 3, "seed": 7},
    ],
    ids=["missing", "not-a-number", "null"],
)
def test_data_position_rejects_a_malformed_dict(stored: dict[str, Any]) -> None:
    with pytest.raises(UserError, match="incomplete or malformed"):
        DataPosition.from_dict(stored, steps_per_epoch=5)


@pytest.mark.parametrize("k", [4, 6, 9])
def test_resume_from_a_stored_position_continues_exactly(k: int) -> None:
    split = _uint8_split(50)
    batch, seed, spe = 8, 5, 50 // 8
    full = list(train_batches(split, batch, seed=seed, start_step=0, num_steps=20))
    stored = json.dumps(DataPosition.at(k, steps_per_epoch=spe, seed=seed).to_dict())
    pos = DataPosition.from_dict(json.loads(stored), steps_per_epoch=spe)
    tail = list(train_batches(split, batch, seed=pos.seed, start_step=pos.step, num_steps=20))
    assert len(tail) == 20 - k
    for a, b in zip(full[k:], tail, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


# ------------------------------------------------------------------------- epoch_batch_table
def test_epoch_batch_table_layout() -> None:
    n, batch = 50, 8
    table = epoch_batch_table(n, batch, seed=3, epoch=0)
    assert table.shape == (n // batch, batch) and table.dtype == np.int32
    # Rows sorted, so every process's contiguous part is sorted too (read locality), whatever
    # the process count; the table itself never depends on it.
    assert np.all(np.diff(table, axis=1) > 0)
    assert len(np.unique(table)) == table.size  # rows disjoint within the epoch
    assert table.min() >= 0 and table.max() < n


def test_epoch_batch_table_is_deterministic_and_differs_by_epoch() -> None:
    a = epoch_batch_table(50, 8, seed=3, epoch=1)
    np.testing.assert_array_equal(a, epoch_batch_table(50, 8, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_batch_table(50, 8, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_batch_table(50, 8, seed=4, epoch=1))
