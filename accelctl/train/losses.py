"""Per-example losses and metrics on logits (batch, classes) and integer labels (batch,).

Token models give logits (batch, T, vocab) and labels (batch, T): everything is per position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float) -> jax.Array:
    """Softmax cross-entropy with optional label smoothing; returns (batch,) float32."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def mse(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean squared error between the outputs and one-hot labels; returns (batch,) float32."""
    del label_smoothing
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return jnp.mean(jnp.square(logits.astype(jnp.float32) - targets), axis=-1)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the arg-max class equals the label, else 0.0; (batch,) float32."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
