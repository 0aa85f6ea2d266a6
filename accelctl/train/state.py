"""TrainState: everything a step reads and writes, as one pytree of device arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

# Running sums since the last metric read; summed on device so the host reads them rarely.
SUM_KEYS = ("loss_sum", "correct", "count")


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
        sums: float32 scalars {loss_sum, correct, count} since the last read.
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: Any
    rng: jax.Array
    plateau: Any
    sums: dict[str, jax.Array]


def zero_sums() -> dict[str, jax.Array]:
    """Fresh metric sums (call inside jit so no host transfer is needed)."""
    return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
