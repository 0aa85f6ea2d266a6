"""Multi-layer perceptron: flatten, [Linear → activation → dropout] × N, Linear to logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from accelctl.models.layers import ACTIVATIONS, logical


class MLP(nnx.Module):
    """MLP over flattened inputs.

    The seeds' MNIST example (Dense 64 relu → Dense 10) is `hidden: [64], activation: relu`.
    Under tensor parallelism the layers alternate Megatron-style: column-split ("embed", "mlp"),
    then row-split ("mlp", "embed"), so each pair needs one all-reduce.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int],
        num_outputs: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        widths = [math.prod(input_shape), *hidden, num_outputs]
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            last = i == len(widths) - 2
            layers.append(
                nnx.Linear(
                    a,
                    b,
                    dtype=dtype,
                    kernel_metadata=logical(*axes[:1], None if last else axes[1]),
                    bias_metadata=logical(None if last else axes[1]),
                    rngs=rngs,
                )
            )
        self.hidden = nnx.List(layers[:-1])
        self.head = layers[-1]
        self.dropout = nnx.Dropout(dropout)
        self.activation = activation

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return logits (batch, num_outputs) for inputs (batch, *input_shape)."""
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for layer in self.hidden:
            x = self.dropout(act(layer(x)), deterministic=not train, rngs=rngs)
        return self.head(x)
