"""A small residual CNN written as a user would write it: plain Flax NNX, no accelctl imports.

accelctl builds it as `ResNet(**model.args, rngs=..., dtype=..., param_dtype=...)` and calls it as
`model(x, train=..., rngs=...)`; x is a batch of images (batch, H, W, C), float32, scaled.
Every weight names its axes with `nnx.with_partitioning`, so `parallel.strategy: tp` can split
the convolutions' channels over the model axis (Megatron-style: the first conv of a block splits
its output channels, "mlp", the second its input channels, so a block needs one all-reduce).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

he_normal = nnx.initializers.he_normal()


def conv(
    cin: int, cout: int, names: tuple[str | None, str | None], *, dtype: Any, rngs: nnx.Rngs
) -> nnx.Conv:
    """3x3 same-padded conv whose kernel (3, 3, cin, cout) names its channel axes."""
    return nnx.Conv(
        cin,
        cout,
        (3, 3),
        use_bias=False,  # the batch norm after it has the bias
        kernel_init=nnx.with_partitioning(he_normal, (None, None, *names)),
        dtype=dtype,
        rngs=rngs,
    )


class Block(nnx.Module):
    """conv-BN-relu-conv-BN plus the input, then relu (He et al. 2016, basic block)."""

    def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs) -> None:
        self.conv1 = conv(channels, channels, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.norm1 = nnx.BatchNorm(channels, momentum=0.9, dtype=dtype, rngs=rngs)
        self.conv2 = conv(channels, channels, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        # Zero-initialised scale: each block starts as the identity, which trains faster.
        self.norm2 = nnx.BatchNorm(
            channels, momentum=0.9, scale_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x), use_running_average=not train))
        y = self.norm2(self.conv2(y), use_running_average=not train)
        return nnx.relu(x + y)


class ResNet(nnx.Module):
    """Stem conv, `blocks` residual blocks at full resolution, global average pool, dropout,
    linear head to `num_classes` logits."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 1,
        channels: int = 24,
        blocks: int = 2,
        dropout: float = 0.1,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        self.stem = conv(in_channels, channels, (None, "embed"), dtype=dtype, rngs=rngs)
        self.stem_norm = nnx.BatchNorm(channels, momentum=0.9, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(channels, dtype=dtype, rngs=rngs) for _ in range(blocks)])
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(
            channels,
            num_classes,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None)),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits (batch, num_classes) for images (batch, H, W, in_channels)."""
        x = nnx.relu(self.stem_norm(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train=train)
        x = x.mean(axis=(1, 2))
        return self.head(self.dropout(x, deterministic=not train, rngs=rngs))
