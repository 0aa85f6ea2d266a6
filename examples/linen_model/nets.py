"""An existing-style `flax.linen` CNN with dropout and batch norm, used by accelctl unchanged.

Nothing here knows about accelctl: `__call__(self, x, train: bool = False)` switches
`nn.Dropout` and `nn.BatchNorm` the usual Linen way. accelctl wraps the class with
`flax.nnx.bridge.ToNNX`, initialises it on one example, and in training calls it with
`train=True`, a fresh "dropout" rng every step and `batch_stats` mutable; evaluation uses the
running averages.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class CNN(nn.Module):
    """Two conv-BN-relu-pool stages, a dense layer with dropout, and the logits."""

    num_classes: int = 10
    features: int = 16
    hidden: int = 64
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(2):
            x = nn.Conv(self.features * 2**i, (3, 3), use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
