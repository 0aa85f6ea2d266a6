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
from accelctl.models.layers import checkpointed
from accelctl.optim import Optimizer
from accelctl.train.losses import correct, resolve_loss
from accelctl.train.state import TRAIN_SUM_KEYS, TrainState, zero_sums

Batch = dict[str, jax.Array]


@dataclass(frozen=True)
class StepConfig:
    """What the step functions need besides the state: fixed at trace time."""

    graphdef: nnx.GraphDef[Any]
    optimizer: Optimizer
    loss: str  # a built-in name or the user's import path (losses.resolve_loss)
    label_smoothing: float
    x_scale: float | None  # integer inputs are cast and scaled on device
    x_mean: tuple[float, ...] | None = None  # per channel (last axis), after scaling
    x_std: tuple[float, ...] | None = None
    crop_padding: int = 0  # training-time augmentation (see data.augment)
    flip: bool = False
    token_inputs: bool = False  # integer token ids go to the model as they are
    accumulate_steps: int = 1  # micro-batches per update (optimizer.accumulate_steps)
    micro_sharding: Any = None  # sharding of a (k, B/k, ...) micro-batch stack under jit
    axis_name: str | None = None  # pmap: the device axis gradients and sums are reduced over
    call_rngs: bool = True  # the model's __call__ takes rngs= (a user's model may not)
    remat: str = "none"  # checkpoint around the whole model call (models.forward_remat)


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


def _split_micro(a: jax.Array, k: int, sharding: Any) -> jax.Array:
    """(B, ...) -> (k, B/k, ...): micro-batch i holds examples i, i+k, i+2k, ..., so every
    device keeps its own rows of a batch sharded along `data` (no data moves)."""
    m = a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(m, sharding) if sharding is not None else m


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

    def call(model: nnx.Module, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        kwargs = {"rngs": rngs} if sc.call_rngs else {}
        return model(x, train=train, **kwargs)

    # model.remat of a model without blocks of its own: one checkpoint around the whole call.
    logits = checkpointed(call, sc.remat)(model, _inputs(x, sc), rngs)
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
    opt = sc.optimizer

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Batch]:
        dropout_key, augment_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        if sc.axis_name is not None:  # pmap: every device draws its own masks
            device = jax.lax.axis_index(sc.axis_name)
            dropout_key = jax.random.fold_in(dropout_key, device)
            augment_key = jax.random.fold_in(augment_key, device)
        x, y = batch["x"], batch["y"]
        if sc.crop_padding or sc.flip:
            x = augment_images(x, rng=augment_key, crop_padding=sc.crop_padding, flip=sc.flip)
        scale = state.loss_scale.scale if state.loss_scale is not None else None
        model_state, grads, loss, n_correct = _gradients(sc, state, x, y, dropout_key, scale)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        n = _num_targets(y)
        if sc.axis_name is not None:
            grads, loss, model_state = jax.lax.pmean((grads, loss, model_state), sc.axis_name)
            n_correct, n = jax.lax.psum((n_correct, n), sc.axis_name)
        updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
        plateau = state.plateau
        if opt.plateau is not None:
            if opt.plateau_monitor == "train_loss":
                _, plateau = opt.plateau.update({}, plateau, value=loss)
            updates = jax.tree.map(lambda u: u * plateau.scale, updates)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient never reaches the state: the whole update is dropped
        # (train.on_nan decides on the host whether the run stops or goes on). Under fp16 loss
        # scaling, non-finite gradients of a finite loss are an overflow: skipped, not an error.
        loss_ok = jnp.isfinite(loss)
        grad_norm = optax.tree.norm(grads)
        grads_ok = jnp.isfinite(grad_norm)
        finite = loss_ok & grads_ok
        loss_scale = state.loss_scale
        if loss_scale is not None:
            overflow, bad = loss_ok & ~grads_ok, ~loss_ok
            loss_scale = loss_scale.adjust(grads_ok, overflow)
        else:
            overflow, bad = jnp.zeros((), bool), ~finite
        params, model_state, opt_state, plateau = _keep_if(
            finite,
            (params, model_state, opt_state, plateau),
            (state.params, state.model_state, state.opt_state, state.plateau),
        )
        n = jnp.where(finite, n, 0.0)
        sums = {
            "loss_sum": state.sums["loss_sum"] + jnp.where(finite, loss, 0.0) * n,
            "correct": state.sums["correct"] + n_correct * (n > 0),
            "count": state.sums["count"] + n,
            "skipped": state.sums["skipped"] + bad.astype(jnp.float32),
            "overflow": state.sums["overflow"] + overflow.astype(jnp.float32),
            # Of the applied updates only: summed here, averaged per log interval on the host.
            "grad_norm": state.sums["grad_norm"] + jnp.where(finite, grad_norm, 0.0),
        }
        first_bad = (state.first_skipped < 0) & bad
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            plateau=plateau,
            sums=sums,
            skipped=state.skipped + bad.astype(jnp.int32),
            first_skipped=jnp.where(first_bad, state.step + 1, state.first_skipped),
            loss_scale=loss_scale,
        )
        return new_state, {"loss": loss}

    return train_step


def _gradients(
    sc: StepConfig,
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    dropout_key: jax.Array,
    scale: jax.Array | None,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """Gradients of the mean loss over the batch, in `sc.accumulate_steps` micro-batches.

    Returns:
        (new model_state, grads (still multiplied by `scale` when given), mean loss, number of
        correct predictions). With k micro-batches of equal size the mean of their gradients is
        the gradient of the whole batch; `lax.scan` runs them one after another, so only one
        micro-batch's activations are alive at a time.
    """
    loss_fn = resolve_loss(sc.loss)

    def objective(params: nnx.State, model_state: nnx.State, x: Any, y: Any, key: Any) -> Any:
        logits, new_model_state = _forward(sc, params, model_state, x, train=True, dropout_key=key)
        loss = jnp.mean(loss_fn(logits, y, label_smoothing=sc.label_smoothing))
        scaled = loss * scale if scale is not None else loss
        return scaled, (loss, jnp.sum(correct(logits, y)), new_model_state)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def micro(model_state: Any, x: Any, y: Any, key: Any) -> tuple[Any, Any, Any, Any]:
        (_, (loss, n_correct, model_state)), grads = grad_fn(state.params, model_state, x, y, key)
        return model_state, grads, loss, n_correct

    k = sc.accumulate_steps
    if k == 1:
        return micro(state.model_state, x, y, dropout_key)

    def body(carry: Any, inputs: Any) -> tuple[Any, None]:
        model_state, g_sum, loss_sum, correct_sum = carry
        xi, yi, i = inputs
        model_state, g, loss, n_correct = micro(
            model_state, xi, yi, jax.random.fold_in(dropout_key, i)
        )
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        return (model_state, g_sum, loss_sum + loss, correct_sum + n_correct), None

    xs, ys = (_split_micro(a, k, sc.micro_sharding) for a in (x, y))
    zero = jnp.zeros((), jnp.float32)
    init = (state.model_state, jax.tree.map(jnp.zeros_like, state.params), zero, zero)
    (model_state, g_sum, loss_sum, correct_sum), _ = jax.lax.scan(
        body, init, (xs, ys, jnp.arange(k))
    )
    return model_state, jax.tree.map(lambda g: g / k, g_sum), loss_sum / k, correct_sum


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


def make_eval_step(sc: StepConfig) -> Callable[[nnx.State, nnx.State, Batch, Batch], Batch]:
    """Return eval_step(params, model_state, batch, sums) -> sums, adding this batch's masked
    sums.

    Only the parameters and the model state are read, so evaluating a checkpoint never needs
    the optimizer state. batch: {"x", "y", "mask"}; padded rows have mask 0 and do not count.
    """
    loss_fn = resolve_loss(sc.loss)

    def eval_step(params: nnx.State, model_state: nnx.State, batch: Batch, sums: Batch) -> Batch:
        logits, _ = _forward(sc, params, model_state, batch["x"], train=False)
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
