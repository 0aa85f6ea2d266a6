"""Pure, jittable train and eval steps: no I/O, no logging, no host synchronisation.

The NNX model is split once (graphdef + states); steps merge it inside the trace, so the
per-step Python cost is only the jitted call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from accelctl.data.augment import augment_images
from accelctl.optim import Optimizer
from accelctl.train.losses import LOSSES, correct
from accelctl.train.state import TRAIN_SUM_KEYS, TrainState, zero_sums

Batch = dict[str, jax.Array]


@dataclass(frozen=True)
class StepConfig:
    """What the step functions need besides the state: fixed at trace time."""

    graphdef: nnx.GraphDef[Any]
    optimizer: Optimizer
    loss: str
    label_smoothing: float
    x_scale: float | None  # integer inputs are cast and scaled on device
    x_mean: tuple[float, ...] | None = None  # per channel (last axis), after scaling
    x_std: tuple[float, ...] | None = None
    crop_padding: int = 0  # training-time augmentation (see data.augment)
    flip: bool = False
    token_inputs: bool = False  # integer token ids go to the model as they are


def _num_targets(y: jax.Array) -> jax.Array:
    """Targets in a batch: one per example, or one per position for token data (B, T)."""
    return jnp.float32(y.size)


def _inputs(x: jax.Array, sc: StepConfig) -> jax.Array:
    if sc.token_inputs:
        return x
    x = x.astype(jnp.float32)
    if sc.x_scale is not None:
        x = x * jnp.float32(sc.x_scale)
    if sc.x_mean is not None and sc.x_std is not None:
        x = (x - jnp.asarray(sc.x_mean, jnp.float32)) / jnp.asarray(sc.x_std, jnp.float32)
    return x


def _forward(
    sc: StepConfig,
    params: nnx.State,
    model_state: nnx.State,
    x: jax.Array,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, nnx.State]:
    # copy=True: the states come from an outer trace; NNX variables must be fresh here.
    model = nnx.merge(sc.graphdef, params, model_state, copy=True)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model(_inputs(x, sc), train=train, rngs=rngs)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return logits, new_model_state


def make_train_step(sc: StepConfig) -> Callable[[TrainState, Batch], tuple[TrainState, Batch]]:
    """Return train_step(state, batch) -> (state, metrics).

    Args:
        sc: graphdef, optimizer, loss and input scaling.
    Returns:
        A pure function. batch: {"x": (B, ...), "y": (B,)} sharded along `data`. metrics:
        {"loss": scalar mean loss of this step}. The state's running sums are updated on device.
    """
    loss_fn = LOSSES[sc.loss]
    opt = sc.optimizer

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Batch]:
        dropout_key, augment_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        x = batch["x"]
        if sc.crop_padding or sc.flip:
            x = augment_images(x, rng=augment_key, crop_padding=sc.crop_padding, flip=sc.flip)

        def objective(params: nnx.State, model_state: nnx.State) -> tuple[jax.Array, Any]:
            logits, new_model_state = _forward(
                sc, params, model_state, x, train=True, dropout_key=dropout_key
            )
            losses = loss_fn(logits, batch["y"], label_smoothing=sc.label_smoothing)
            return jnp.mean(losses), (logits, new_model_state)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, (logits, model_state)), grads = grad_fn(state.params, state.model_state)
        updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
        plateau = state.plateau
        if opt.plateau is not None:
            if opt.plateau_monitor == "train_loss":
                _, plateau = opt.plateau.update({}, plateau, value=loss)
            updates = jax.tree.map(lambda u: u * plateau.scale, updates)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient never reaches the state: the whole update is dropped
        # (train.on_nan decides on the host whether the run stops or goes on).
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        params, model_state, opt_state, plateau = _keep_if(
            finite,
            (params, model_state, opt_state, plateau),
            (state.params, state.model_state, state.opt_state, state.plateau),
        )
        n = jnp.where(finite, _num_targets(batch["y"]), 0.0)
        sums = {
            "loss_sum": state.sums["loss_sum"] + jnp.where(finite, loss, 0.0) * n,
            "correct": state.sums["correct"] + jnp.sum(correct(logits, batch["y"])) * (n > 0),
            "count": state.sums["count"] + n,
            "skipped": state.sums["skipped"] + (~finite).astype(jnp.float32),
        }
        first_bad = (state.first_skipped < 0) & ~finite
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            plateau=plateau,
            sums=sums,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            first_skipped=jnp.where(first_bad, state.step + 1, state.first_skipped),
        )
        return new_state, {"loss": loss}

    return train_step


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the scalar `ok` is true, else `old`, leaf by leaf (one select per leaf)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_cached_train_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Batch]],
    gather_fn: Callable[[Batch, jax.Array], Batch],
    steps_per_epoch: int,
) -> Callable[[TrainState, Any], tuple[TrainState, Batch]]:
    """Return step(state, feed) that gathers its batch from the device-cached split first.

    Args:
        train_step: from `make_train_step`.
        gather_fn: `data.make_gather(mesh)`.
        steps_per_epoch: rows of the epoch index table.
    Returns:
        A pure function; feed = {"cache": {"x", "y"}, "idx": (steps_per_epoch, B) int32}. The row
        is chosen by the global step, so a run resumed mid-epoch takes the right batch.
    """

    def cached_train_step(state: TrainState, feed: Any) -> tuple[TrainState, Batch]:
        row = jax.lax.dynamic_index_in_dim(
            feed["idx"], state.step % steps_per_epoch, keepdims=False
        )
        return train_step(state, gather_fn(feed["cache"], row))

    return cached_train_step


def make_eval_step(sc: StepConfig) -> Callable[[TrainState, Batch, Batch], Batch]:
    """Return eval_step(state, batch, sums) -> sums, adding this batch's masked sums.

    batch: {"x", "y", "mask"}; padded rows have mask 0 and do not count.
    """
    loss_fn = LOSSES[sc.loss]

    def eval_step(state: TrainState, batch: Batch, sums: Batch) -> Batch:
        logits, _ = _forward(sc, state.params, state.model_state, batch["x"], train=False)
        losses = loss_fn(logits, batch["y"], label_smoothing=sc.label_smoothing)
        # mask (B,): padded examples count 0; for token data it covers every position.
        mask = batch["mask"].reshape(batch["mask"].shape + (1,) * (losses.ndim - 1))
        mask = jnp.broadcast_to(mask, losses.shape)
        return {
            "loss_sum": sums["loss_sum"] + jnp.sum(losses * mask),
            "correct": sums["correct"] + jnp.sum(correct(logits, batch["y"]) * mask),
            "count": sums["count"] + jnp.sum(mask),
        }

    return eval_step


def make_take_sums(sc: StepConfig) -> Callable[[TrainState], tuple[TrainState, Batch]]:
    """Return take_sums(state) -> (state with zeroed sums, sums + current lr).

    Called once per log interval, so resetting costs no per-step work.
    """
    opt = sc.optimizer

    def take_sums(state: TrainState) -> tuple[TrainState, Batch]:
        lr = jnp.asarray(opt.lr_fn(jnp.maximum(state.step - 1, 0)), jnp.float32)
        if opt.plateau is not None:
            lr = lr * state.plateau.scale
        return state.replace(sums=zero_sums(TRAIN_SUM_KEYS)), {**state.sums, "lr": lr}

    return take_sums


def make_plateau_step(sc: StepConfig) -> Callable[[TrainState, Batch], TrainState]:
    """Return plateau_step(state, eval_sums) -> state, feeding the eval loss to the plateau."""
    plateau = sc.optimizer.plateau
    assert plateau is not None

    def plateau_step(state: TrainState, eval_sums: Batch) -> TrainState:
        value = eval_sums["loss_sum"] / jnp.maximum(eval_sums["count"], 1.0)
        _, new = plateau.update({}, state.plateau, value=value)
        return state.replace(plateau=new)

    return plateau_step
