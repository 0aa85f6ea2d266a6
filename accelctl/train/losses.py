"""Per-example losses and metrics on logits (batch, classes) and integer labels (batch,).

Token models give logits (batch, T, vocab) and labels (batch, T): everything is per position.

`train.loss` names a built-in loss (cross_entropy, mse) or the user's own function by import path
(`package.module:fn` or `path/to/file.py:fn`): `fn(logits, targets) -> per-example loss` of shape
(batch,), or (batch, T) for token data; the step averages it. It receives the logits in float32
(whatever `precision.compute` is) and the integer labels as the data gives them. Accuracy stays
"arg-max of the logits == label", which is what it means whenever the targets are class ids (they
are for every data source today), whatever the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from accelctl.errors import FieldError

LossFn = Callable[..., jax.Array]  # fn(logits, labels, *, label_smoothing) -> per-example loss

LOSS_FIELD = ("train", "loss")


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


def resolve_loss(name_or_target: str) -> LossFn:
    """The loss function `train.loss` names.

    Args:
        name_or_target: a key of LOSSES, or an import path to the user's fn(logits, targets).
    Returns:
        fn(logits, labels, *, label_smoothing) -> per-example loss. A user's function is called
        as fn(float32 logits, labels); label_smoothing is not passed to it (`check_loss` refuses
        a non-zero one).
    Raises:
        FieldError(train.loss): not importable, not callable, or it cannot take two positional
            arguments.
    """
    if name_or_target in LOSSES:
        return LOSSES[name_or_target]
    from accelctl.imports import import_target

    user_fn = import_target(name_or_target, LOSS_FIELD)
    if not callable(user_fn) or isinstance(user_fn, type):
        raise FieldError(
            LOSS_FIELD,
            f"{name_or_target.rpartition(':')[2]} is a {type(user_fn).__name__}, not a function; "
            "train.loss must name fn(logits, targets) -> per-example loss",
        )
    try:
        inspect.signature(user_fn).bind(None, None)
    except ValueError:  # no signature to inspect (a builtin): it is checked when traced
        pass
    except TypeError:
        raise FieldError(
            LOSS_FIELD,
            f"{name_or_target.rpartition(':')[2]}{inspect.signature(user_fn)} cannot be called as "
            "fn(logits, targets); it must take the logits and the targets as its first two "
            "positional arguments (any others need defaults)",
        ) from None

    def user_loss(logits: jax.Array, labels: jax.Array, *, label_smoothing: float) -> jax.Array:
        del label_smoothing  # refused with a user's loss (check_loss)
        return user_fn(logits.astype(jnp.float32), labels)

    return user_loss


def check_loss(name_or_target: str, label_smoothing: float) -> None:
    """Raise FieldError when `train.loss` cannot be resolved or label smoothing cannot apply.

    Args:
        name_or_target: `train.loss`.
        label_smoothing: `train.label_smoothing` (built-in cross_entropy only).
    """
    resolve_loss(name_or_target)
    if name_or_target not in LOSSES and label_smoothing:
        raise FieldError(
            ("train", "label_smoothing"),
            f"{label_smoothing} applies to the built-in cross_entropy only; your loss "
            f"{name_or_target.rpartition(':')[2]} gets the integer targets: smooth them inside "
            "it, or set train.label_smoothing: 0",
        )


def check_loss_output(name_or_target: str, logits: Any, labels: Any) -> None:
    """Raise FieldError(train.loss) unless the loss of abstract logits is per example.

    Args:
        name_or_target: `train.loss`.
        logits: abstract logits (ShapeDtypeStruct) of a small batch.
        labels: abstract labels of that batch, (batch,) or (batch, T).
    """
    if name_or_target in LOSSES:
        return
    from accelctl.imports import describe_error

    fn = resolve_loss(name_or_target)
    name = name_or_target.rpartition(":")[2]
    try:
        out = jax.eval_shape(lambda a, b: fn(a, b, label_smoothing=0.0), logits, labels)
    except Exception as e:
        raise FieldError(
            LOSS_FIELD,
            f"{name}(logits {tuple(logits.shape)}, targets {tuple(labels.shape)} "
            f"{labels.dtype}) failed: {describe_error(e)}",
        ) from None
    shape = tuple(getattr(out, "shape", ()))
    if shape != tuple(labels.shape) or not hasattr(out, "dtype"):
        raise FieldError(
            LOSS_FIELD,
            f"{name} returned {shape if hasattr(out, 'shape') else type(out).__name__} for "
            f"logits {tuple(logits.shape)} and targets {tuple(labels.shape)}; it must return "
            f"one loss per example, shape {tuple(labels.shape)} (accelctl takes the mean, "
            "leaving out padded evaluation examples)",
        )
