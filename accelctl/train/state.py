"""TrainState: everything a step reads and writes, as one pytree of device arrays."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

# Running sums since the last metric read; summed on device so the host reads them rarely.
SUM_KEYS = ("loss_sum", "correct", "count")
# Train sums also count the steps whose update was skipped: non-finite loss or gradients
# ("skipped", train.on_nan decides), and fp16 gradient overflows ("overflow", loss scaling).
TRAIN_SUM_KEYS = (*SUM_KEYS, "skipped", "overflow")


@struct.dataclass
class TrainState:
    """Model parameters, the rest of the model state, optimizer state and bookkeeping.

    Attributes:
        step: int32 scalar, optimizer updates done.
        params: nnx.State of nnx.Param leaves (what the optimizer updates).
        model_state: nnx.State of the other variables (e.g. BatchNorm statistics).
        opt_state: optax state for `params`.
        rng: base PRNG key; step s uses fold_in(rng, s) for dropout.
        plateau: ReduceLROnPlateau state (optax.contrib) or None.
        sums: float32 scalars {loss_sum, correct, count, skipped} since the last read.
        skipped: int32 scalar, steps whose update was skipped (non-finite) in the whole run.
        first_skipped: int32 scalar, the first such step (1-based, as logged), -1 if none.
        loss_scale: precision.LossScale for fp16 compute, else None.
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: Any
    rng: jax.Array
    plateau: Any
    sums: dict[str, jax.Array]
    skipped: jax.Array
    first_skipped: jax.Array
    loss_scale: Any = None


def zero_sums(keys: tuple[str, ...] = SUM_KEYS) -> dict[str, jax.Array]:
    """Fresh metric sums (call inside jit so no host transfer is needed)."""
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def digest(host_tree: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order (host arrays).

    Two runs that end with bit-identical parameters have the same digest.
    """
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(host_tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
