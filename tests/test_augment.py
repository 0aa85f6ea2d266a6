"""On-device augmentation: crop and flip checked by brute force, keys, sharding, config checks."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.config import ConfigError
from accelctl.data import augment_images
from accelctl.train.job import build_job


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random uint8 images with no zero pixel, so padding is recognisable."""
    return np.random.default_rng(seed).integers(1, 256, size=shape, dtype=np.uint8)


def _augment(x: np.ndarray, seed: int = 0, **kw: object) -> np.ndarray:
    out = augment_images(x, rng=jax.random.key(seed), **kw)  # type: ignore[arg-type]
    assert out.shape == x.shape and out.dtype == x.dtype
    return np.asarray(out)


def _windows(image: np.ndarray, p: int) -> list[np.ndarray]:
    """Every (H, W) window of the zero-padded image, in offset order (dy, dx)."""
    h, w = image.shape[:2]
    pad = ((p, p), (p, p)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad)
    return [padded[dy : dy + h, dx : dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]


def _offset(out: np.ndarray, image: np.ndarray, p: int) -> int | None:
    """Index of the window of `image` that `out` equals, or None."""
    for i, window in enumerate(_windows(image, p)):
        if np.array_equal(out, window):
            return i
    return None


@pytest.mark.parametrize("shape", [(8, 5, 6), (8, 5, 6, 3)], ids=["BHW", "BHWC"])
def test_no_crop_and_no_flip_is_the_identity(shape: tuple[int, ...]) -> None:
    x = _images(shape)
    np.testing.assert_array_equal(_augment(x, crop_padding=0, flip=False), x)


@pytest.mark.parametrize("shape", [(64, 5, 6), (64, 5, 6, 2)], ids=["BHW", "BHWC"])
def test_flip_mirrors_some_images_left_right(shape: tuple[int, ...]) -> None:
    x = _images(shape)
    out = _augment(x, flip=True)
    same = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)]
    assert all(s != m for s, m in zip(same, mirrored, strict=True))  # exactly one of the two
    assert 0 < sum(mirrored) < len(x)


@pytest.mark.parametrize("shape", [(32, 5, 6), (32, 5, 6, 3)], ids=["BHW", "BHWC"])
@pytest.mark.parametrize("p", [1, 2])
def test_crop_is_a_shifted_window_of_the_padded_image(shape: tuple[int, ...], p: int) -> None:
    x = _images(shape)
    out = _augment(x, crop_padding=p)
    offsets = [_offset(o, i, p) for o, i in zip(out, x, strict=True)]
    assert None not in offsets
    assert len(set(offsets)) > 1  # the offset is drawn per example
    assert any(o != 2 * p * (p + 1) for o in offsets)  # not always the centre (= identity)


def test_crop_and_flip_together() -> None:
    x = _images((32, 5, 6, 2))
    out = _augment(x, crop_padding=1, flip=True)
    for o, i in zip(out, x, strict=True):
        assert _offset(o, i, 1) is not None or _offset(o[:, ::-1], i, 1) is not None


def test_same_key_same_result_other_key_differs() -> None:
    x = _images((32, 6, 6, 1))
    a = _augment(x, seed=0, crop_padding=2, flip=True)
    np.testing.assert_array_equal(a, _augment(x, seed=0, crop_padding=2, flip=True))
    assert not np.array_equal(a, _augment(x, seed=1, crop_padding=2, flip=True))


def test_result_does_not_depend_on_the_sharding() -> None:
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    sharding = NamedSharding(mesh, P("data"))
    x = _images((64, 6, 6, 2))
    fn = jax.jit(partial(augment_images, crop_padding=2, flip=True))
    key = jax.random.key(3)
    whole = fn(x, rng=key)
    sharded = fn(jax.device_put(x, sharding), rng=key)
    assert sharded.sharding.is_equivalent_to(sharding, sharded.ndim)  # kept sharded
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))
    np.testing.assert_array_equal(np.asarray(whole), _augment(x, seed=3, crop_padding=2, flip=True))


@pytest.mark.parametrize("shape", [(4, 16), (4,), (2, 3, 4, 4, 1)])
def test_non_image_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="needs images"):
        augment_images(np.zeros(shape, np.uint8), rng=jax.random.key(0), flip=True)


# ------------------------------------------------------------------------------ config checks
def test_augment_on_non_image_data_is_a_config_error(tiny_config) -> None:
    cfg = tiny_config(["data.shape=[16]", "data.augment={crop_padding: 2}"])
    with pytest.raises(ConfigError, match=r"data\.augment") as info:
        build_job(cfg)
    assert "(16,)" in str(info.value) and "--set" in str(info.value)


def test_mean_with_the_wrong_number_of_channels_is_a_config_error(tiny_config) -> None:
    cfg = tiny_config(["data.mean=[0.5, 0.5]", "data.std=[0.2, 0.2]"])  # 1 channel
    with pytest.raises(ConfigError, match=r"data\.mean") as info:
        build_job(cfg)
    assert "2 values" in str(info.value) and "1 channel(s)" in str(info.value)


def test_grayscale_images_without_a_channel_axis_have_one_channel(tiny_config) -> None:
    # (H, W) images: the last axis is the width, not channels, so 8 values are wrong.
    eight = "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"
    cfg = tiny_config(["data.shape=[4, 8]", f"data.mean={eight}", f"data.std={eight}"])
    with pytest.raises(ConfigError, match=r"1 channel\(s\)"):
        build_job(cfg)
    build_job(tiny_config(["data.shape=[4, 8]", "data.mean=[0.5]", "data.std=[0.25]"]))
