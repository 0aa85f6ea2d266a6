"""Multi-layer perceptron: flatten, [Linear → activation → dropout] × N, Linear to logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from accelctl.models.layers import ACTIVATIONS


class MLP(nnx.Module):
    """MLP over flattened inputs.

    The seeds' MNIST example (Dense 64 relu → Dense 10) is `hidden: [64], activation: relu`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int],
        num_outputs: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ) -> None:
        widths = [math.prod(input_shape), *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.head = nnx.Linear(widths[-1], num_outputs, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.activation = activation

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return logits (batch, num_outputs) for inputs (batch, *input_shape)."""
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            x = self.dropout(act(layer(x)), deterministic=not train, rngs=rngs)
        return self.head(x)
