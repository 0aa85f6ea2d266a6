"""Small pieces shared by the model families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def logical(*names: str | None) -> dict[str, Any]:
    """Parameter metadata naming each axis of a weight, e.g. logical("embed", "mlp").

    Pass it as `kernel_metadata=` / `bias_metadata=`. It is Flax NNX's own partitioning metadata
    (`out_sharding`, what `nnx.with_partitioning` sets), holding *logical* names that
    `parallel.py` maps to mesh axes (tensor parallelism), so no model hard-codes a mesh. Names in
    use: "embed" (model width, never split by tp), "mlp" (feed-forward hidden), "heads"
    (attention heads x head size), "vocab"; None = an axis that is never split.
    `eager_sharding: False` keeps Flax from placing the value at creation (it would need a mesh
    that knows these names); accelctl places the whole state itself (`jit(out_shardings=...)`).
    """
    return {"out_sharding": names, "eager_sharding": False}


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def pool2x2(x: jax.Array, kind: str) -> jax.Array:
    """Non-overlapping 2x2 max/avg pooling of NHWC maps; odd sizes are floored, 1-pixel axes kept.

    Written as reshape + reduce instead of `reduce_window`: the gradient of a max
    `reduce_window` is a select-and-scatter, which XLA:CPU runs several times slower
    (a CNN step on MNIST: 116 -> 74 ms, docs/benchmarks/bench.md). The forward values equal
    `nnx.max_pool`/`nnx.avg_pool` with window = stride = 2; where several inputs tie for the
    max, the gradient is shared between them instead of going to the first one.
    """
    b, h, w, c = x.shape
    wh, ww = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
    oh, ow = h // wh, w // ww
    x = x[:, : oh * wh, : ow * ww].reshape(b, oh, wh, ow, ww, c)
    return x.max(axis=(2, 4)) if kind == "max" else x.mean(axis=(2, 4))


def remat_policy(mode: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of a `model.remat` mode (full, dots, offload).

    full saves nothing inside the checkpoint (JAX's default policy, None); dots saves the outputs
    of matmuls without batch dimensions (x @ W of the linear layers) and recomputes the rest;
    offload saves the same outputs in pinned host memory instead of device memory.
    """
    policies = jax.checkpoint_policies
    if mode == "full":
        return None
    if mode == "dots":
        return policies.dots_with_no_batch_dims_saveable
    if mode == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"unknown remat mode {mode!r}; use none, full, dots or offload")


def checkpointed(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """`fn` under activation checkpointing (`nnx.remat`) with the policy of `mode`.

    Args:
        fn: a function (not a bound method) whose arguments may be NNX modules; NNX carries
            their state updates (batch statistics, RNG counters) out of the checkpoint.
        mode: none (fn itself), full, dots or offload (see `remat_policy`).
    Returns:
        A function of the same signature: the same values and gradients, but the backward pass
        recomputes what the policy did not save instead of keeping it from the forward pass.
    """
    if mode == "none":
        return fn
    return nnx.remat(fn, policy=remat_policy(mode))
