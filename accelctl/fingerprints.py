"""Fingerprints of a pytree of arrays: two uint32 words per leaf from its exact bits.

A checkpoint records them in its metadata when it is saved and `restore` compares them, so
flipped bytes inside array data are found instead of training on damaged weights.

The words of a leaf are the sum of its 32-bit words and the sum of each word times its
position + 1 (mod 2^32), over the leaf's words in row-major order (8-byte values: all low
halves, then all high halves; 1- and 2-byte values widened; bool as uint8; PRNG keys as their
key data). Integer sums are exact in any order and on any sharding, so the same values give
the same words on save and on restore; one flipped bit always changes the plain sum.

Two ways to compute the same words:

- on the devices (accelerators): one jitted reduction per leaf; only the words come back, and
  XLA fuses the bit reinterpretation into the reduction.
- on the host, for arrays on the CPU backend: XLA:CPU does not fuse the reinterpretation and
  would hold two temporary copies of the whole state; numpy reads each shard in place (its
  memory is the host's) a block at a time, so the extra memory is one block. Processes sum
  their partial words (one small all-gather).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

BLOCK_ELEMENTS = 1 << 18  # host path: elements per block (about 10 MB of temporaries)
_MASK = np.uint64(0xFFFFFFFF)


def fingerprints(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of a pytree of arrays (see the module docstring).

    Args:
        tree: jax or numpy arrays, any sharding; on several processes every process passes
            its part of the same global arrays.
    Returns:
        The two words of every leaf, keyed by its dotted path (`params.layers.0.kernel`).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in flat]
    leaves = [_words_view(leaf) for _, leaf in flat]
    if all(_on_host(leaf) for leaf in leaves):
        words = np.stack([_host_words(leaf) for leaf in leaves]) if leaves else np.zeros((0, 2))
        words = _sum_over_processes(words.astype(np.uint64))
    else:
        words = np.asarray(jax.device_get(_device_words(leaves))).reshape(-1, 2)
    return {p: [int(v) for v in w] for p, w in zip(paths, words, strict=True)}


def path_str(path: tuple[Any, ...]) -> str:
    """A pytree key path as dotted text: `params.layers.0.kernel`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _words_view(leaf: Any) -> Any:
    """PRNG keys as their key data (what the words are taken from); other leaves as given."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def _on_host(leaf: Any) -> bool:
    if isinstance(leaf, jax.Array):
        return all(d.platform == "cpu" for d in leaf.sharding.device_set)
    return isinstance(leaf, np.ndarray | np.generic | int | float | bool)


# ---- on the devices -------------------------------------------------------------------------


def _leaf_words(x: Any) -> Any:
    import jax.numpy as jnp

    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).reshape(-1)
    if bits.dtype == jnp.uint64:  # both halves count
        bits = jnp.concatenate([bits.astype(jnp.uint32), (bits >> 32).astype(jnp.uint32)])
    bits = bits.astype(jnp.uint32)
    weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _device_words(leaves: list[Any]) -> Any:
    import jax.numpy as jnp

    if not leaves:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_leaf_words(x) for x in leaves])


# ---- on the host ----------------------------------------------------------------------------


def _host_words(leaf: Any) -> np.ndarray:
    """[sum, weighted sum] (uint64, mod 2^32) of this process's part of one leaf: every shard
    whose replica_id is 0 (each part of a global array has one such copy in the job)."""
    total = np.zeros(2, np.uint64)
    if not isinstance(leaf, jax.Array):
        a = np.asarray(leaf)
        return _block_words(a, a.shape, tuple(slice(0, n) for n in a.shape))
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        data = np.asarray(shard.data)  # the device buffer itself on the CPU backend
        index = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in shard.index)
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, leaf.shape, strict=True))
        total += _block_words(data, leaf.shape, index)
    return total & _MASK


def _block_words(data: np.ndarray, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The words of `data`, which sits at `index` (start:stop per axis) of a global array of
    `shape`, a block of leading-axis rows at a time."""
    total = np.zeros(2, np.uint64)
    if data.size == 0:
        return total
    size = int(np.prod(shape))
    strides = [int(np.prod(shape[k + 1 :])) for k in range(len(shape))]
    if data.ndim == 0:
        return _words_at(data.reshape(1), np.zeros(1, np.uint64), size)
    row = max(1, data.size // data.shape[0])
    step = max(1, BLOCK_ELEMENTS // row)
    inner = np.zeros((1,) * data.ndim, np.uint64)
    for k in range(1, data.ndim):
        axis = (index[k].start + np.arange(data.shape[k], dtype=np.uint64)) * np.uint64(strides[k])
        inner = inner + axis.reshape([-1 if j == k else 1 for j in range(data.ndim)])
    for r in range(0, data.shape[0], step):
        block = data[r : r + step]
        first = np.arange(r, r + block.shape[0], dtype=np.uint64) + np.uint64(index[0].start)
        position = first.reshape([-1] + [1] * (data.ndim - 1)) * np.uint64(strides[0]) + inner
        total += _words_at(block, position, size)
    return total


def _words_at(values: np.ndarray, position: np.ndarray, size: int) -> np.ndarray:
    """[sum, weighted sum] of `values` whose flat positions in their leaf are `position`
    (uint64 arithmetic wraps mod 2^64, which keeps the residue mod 2^32)."""
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[values.dtype.itemsize]
    bits = values.view(unsigned)
    halves = [(bits, np.uint64(0))]
    if unsigned is np.uint64:  # low halves at 0..n-1, high halves at n..2n-1
        halves = [(bits & _MASK, np.uint64(0)), (bits >> np.uint64(32), np.uint64(size))]
    total = np.zeros(2, np.uint64)
    with np.errstate(over="ignore"):
        for word, offset in halves:
            word = word.astype(np.uint64)
            total[0] += np.sum(word, dtype=np.uint64)
            total[1] += np.sum(word * (position + offset + np.uint64(1)), dtype=np.uint64)
    return total


def _sum_over_processes(words: np.ndarray) -> np.ndarray:
    """Every process's partial words summed (mod 2^32)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(words.astype(np.uint32))
        words = np.sum(np.asarray(gathered, np.uint64), axis=0, dtype=np.uint64)
    return (words & _MASK).astype(np.uint32)
