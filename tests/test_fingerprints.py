"""Checkpoint fingerprints: the host path (CPU backend) gives the device path's words for every
dtype and sharding, finds one flipped bit anywhere, and keeps its temporaries to a block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from accelctl import fingerprints as fp


def _device_words(tree):
    """The accelerator path's words, computed here on the CPU devices."""
    leaves = [fp._words_view(x) for x in jax.tree.leaves(tree)]
    return np.asarray(jax.device_get(fp._device_words(leaves))).reshape(-1, 2).tolist()


def _leaves():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((37, 5)).astype(np.float32),
        "bf16": rng.standard_normal((16, 24)).astype(jnp.bfloat16),
        "f16": rng.standard_normal((8,)).astype(np.float16),
        "i8": rng.integers(-128, 127, (16, 3), dtype=np.int8),
        "bool": rng.integers(0, 2, (24,)).astype(bool),
        "u32": rng.integers(0, 2**32, (16, 16), dtype=np.uint32),
        "i64": rng.integers(-(2**62), 2**62, (8, 5), dtype=np.int64),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "nan": np.array([np.nan, -0.0, np.inf], np.float32),
    }


@pytest.mark.parametrize(
    "spec",
    [None, PartitionSpec(), PartitionSpec("a"), PartitionSpec("a", "b"), PartitionSpec(None, "b")],
    ids=["one-device", "replicated", "rows", "rows-cols", "cols"],
)
def test_the_host_words_equal_the_device_words(spec):
    jax.config.update("jax_enable_x64", True)  # int64 leaves stay int64
    try:
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
        tree = {}
        for name, value in _leaves().items():
            x = jnp.asarray(value)
            if spec is not None:
                s = spec if len(spec) <= x.ndim else PartitionSpec()
                fits = all(ax is None or x.shape[i] % mesh.shape[ax] == 0 for i, ax in enumerate(s))
                x = jax.device_put(x, NamedSharding(mesh, s if fits else PartitionSpec()))
            tree[name] = x
        tree["key"] = jax.random.key(7)
        words = fp.fingerprints(tree)
        assert list(words.values()) == _device_words(tree)
        assert sorted(words) == sorted(tree)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_numpy_leaves_and_blocks_smaller_than_a_leaf(monkeypatch):
    a = np.random.default_rng(1).standard_normal((301, 7)).astype(np.float32)
    whole = fp.fingerprints({"a": a})
    monkeypatch.setattr(fp, "BLOCK_ELEMENTS", 50)  # 7 rows a block: 43 blocks
    assert fp.fingerprints({"a": a}) == whole == fp.fingerprints({"a": jnp.asarray(a)})
    assert list(whole.values()) == _device_words({"a": jnp.asarray(a)})


@pytest.mark.parametrize("position", [0, 1, 2, 350, 2 * 3 * 100 - 1])
@pytest.mark.parametrize("bit", [0, 7, 22, 31])
def test_one_flipped_bit_changes_the_words(position, bit):
    a = np.random.default_rng(2).standard_normal((2, 3, 100)).astype(np.float32)
    flipped = a.copy().reshape(-1).view(np.uint32)
    flipped[position] ^= np.uint32(1 << bit)
    flipped = flipped.view(np.float32).reshape(a.shape)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", None, "b")))  # noqa: E731
    assert fp.fingerprints({"x": put(a)}) != fp.fingerprints({"x": put(flipped)})


def test_the_host_path_keeps_the_state_in_place():
    """The CPU path reads the arrays' own buffers: its temporaries stay a few blocks, not the
    two whole copies XLA:CPU would hold (measured with numpy's allocation tracing)."""
    import tracemalloc

    big = jnp.ones((8192, 1024), jnp.float32)  # 32 MB, 32 blocks
    tracemalloc.start()
    try:
        fp.fingerprints({"big": big})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes / 2, peak  # a block's uint64 temporaries, not two copies
