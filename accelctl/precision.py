"""Dtype policy and dynamic loss scaling.

Parameters and optimizer state are always float32; `precision.compute` picks the dtype the layers
compute in. bf16 has float32's exponent range and needs no scaling. fp16 overflows easily, so its
loss is multiplied by a scale before differentiation and the gradients divided by it afterwards;
a step whose scaled gradients overflow is skipped, the scale halves, and after
`growth_interval` clean steps it doubles again (Micikevicius et al. 2018).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

COMPUTE_DTYPES: dict[str, Any] = {
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
    "fp16": jnp.float16,
}


def compute_dtype(cfg: Any) -> Any:
    """The layers' compute dtype for the `precision` section (None = float32, flax's default)."""
    return None if cfg.compute == "fp32" else COMPUTE_DTYPES[cfg.compute]


@struct.dataclass
class LossScale:
    """Dynamic loss scale, carried in the TrainState (so it is checkpointed and resumed).

    Attributes:
        scale: float32 scalar the loss is multiplied by.
        good_steps: int32 scalar, overflow-free steps since the scale last changed.
        overflows: int32 scalar, steps skipped for overflow in the whole run.
        growth_interval: clean steps after which the scale doubles (static).
    """

    scale: jax.Array
    good_steps: jax.Array
    overflows: jax.Array
    growth_interval: int = struct.field(pytree_node=False, default=2000)

    def adjust(self, grads_finite: jax.Array, overflow: jax.Array) -> LossScale:
        """The scale after a step: halve when the gradients were not finite (never below 1),
        double after `growth_interval` clean steps; `overflow` counts the step as an overflow."""
        grow = grads_finite & (self.good_steps + 1 >= self.growth_interval)
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.scale * 2.0, self.scale),
            jnp.maximum(self.scale * 0.5, 1.0),
        )
        good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(
            scale=scale,
            good_steps=good.astype(jnp.int32),
            overflows=self.overflows + overflow.astype(jnp.int32),
        )


def init_loss_scale(cfg: Any) -> LossScale | None:
    """A LossScale for fp16 compute, else None (call inside jit or eagerly)."""
    if cfg.compute != "fp16":
        return None
    return LossScale(
        scale=jnp.asarray(cfg.loss_scale, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        overflows=jnp.zeros((), jnp.int32),
        growth_interval=cfg.growth_interval,
    )
