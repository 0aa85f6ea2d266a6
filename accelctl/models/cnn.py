"""Convolutional network: [Conv → (BatchNorm) → activation → pool] × N, flatten, dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from accelctl.models.layers import ACTIVATIONS, pool2x2


class CNN(nnx.Module):
    """Conv stack over NHWC images with a dense head; a (H, W) input gets a channel axis added."""

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        channels: Sequence[int],
        kernels: Sequence[int],
        pool: str,
        batch_norm: bool,
        dense: Sequence[int],
        num_outputs: int,
        activation: str = "relu",
        dropout: float = 0.0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        shape = list(input_shape) if len(input_shape) == 3 else [*input_shape, 1]
        if len(shape) != 3:
            raise ValueError(f"cnn needs image inputs (H, W[, C]); got shape {tuple(input_shape)}")
        h, w, c = shape
        convs, norms = [], []
        for ch, k in zip(channels, kernels, strict=True):
            convs.append(
                nnx.Conv(
                    c, ch, (k, k), padding="SAME", use_bias=not batch_norm, dtype=dtype, rngs=rngs
                )
            )
            norms.append(
                nnx.BatchNorm(ch, momentum=0.9, dtype=dtype, rngs=rngs) if batch_norm else None
            )
            c = ch
            if pool != "none":
                h, w = max(h // 2, 1), max(w // 2, 1)
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        widths = [h * w * c, *dense]
        self.dense = nnx.List(
            [
                nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.head = nnx.Linear(widths[-1], num_outputs, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.pool = pool
        self.activation = activation
        self.image_ndim = len(input_shape)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return logits (batch, num_outputs) for images (batch, H, W[, C])."""
        if self.image_ndim == 2:
            x = x[..., None]
        act = ACTIVATIONS[self.activation]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            if norm is not None:
                x = norm(x, use_running_average=not train)
            x = act(x)
            if self.pool != "none":
                x = pool2x2(x, self.pool)
        x = x.reshape(x.shape[0], -1)
        for layer in self.dense:
            x = self.dropout(act(layer(x)), deterministic=not train, rngs=rngs)
        return self.head(x)
