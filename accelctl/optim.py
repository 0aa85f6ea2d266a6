"""optax optimizers and learning-rate schedules from the config.

ReduceLROnPlateau uses `optax.contrib.reduce_on_plateau`, but its state is kept apart from the
optimizer chain so the loop can drive it with the eval loss (known only after an evaluation) as
well as the train loss (inside the step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optax

from accelctl.config import OptimizerConfig, ScheduleConfig


@dataclass(frozen=True)
class Optimizer:
    """The update rule, its learning-rate schedule, and the optional plateau controller."""

    tx: optax.GradientTransformation
    lr_fn: Callable[[int], float]  # schedule without the plateau scale; jax-traceable
    plateau: optax.GradientTransformationExtraArgs | None
    plateau_monitor: str | None  # "eval_loss" | "train_loss" | None


def make_schedule(cfg: ScheduleConfig, lr: float, total_steps: int) -> optax.Schedule:
    """Return lr(step) for the configured schedule (warmup included; plateau → constant base).

    Args:
        cfg: the `schedule` section.
        lr: the peak learning rate (`optimizer.lr`).
        total_steps: steps in the run (linear/cosine decay over what follows the warmup).
    """
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.name in ("constant", "plateau"):
        main: optax.Schedule = optax.constant_schedule(lr)
    elif cfg.name == "linear":
        main = optax.linear_schedule(lr, lr * cfg.end_factor, decay_steps)
    elif cfg.name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_factor)
    elif cfg.name == "piecewise":
        main = optax.piecewise_constant_schedule(
            lr, dict(zip(cfg.boundaries, cfg.factors, strict=True))
        )
    elif cfg.name == "step":
        assert cfg.step_every is not None
        main = optax.exponential_decay(lr, cfg.step_every, cfg.gamma, staircase=True)
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _base(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    if cfg.name == "sgd":
        return optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adagrad":
        return optax.adagrad(lr, eps=cfg.eps)
    if cfg.name == "rmsprop":
        return optax.rmsprop(lr, decay=cfg.decay, eps=cfg.eps, momentum=cfg.momentum or None)
    if cfg.name == "lion":
        return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def build(opt: OptimizerConfig, schedule: ScheduleConfig, total_steps: int) -> Optimizer:
    """Build the optax transform for the config.

    Args:
        opt: the `optimizer` section.
        schedule: the `schedule` section.
        total_steps: optimizer updates in the whole run.
    Returns:
        Optimizer: `tx` (clip → L2 decay → base rule), `lr_fn`, and the plateau controller.
    """
    lr_fn = make_schedule(schedule, opt.lr, total_steps)
    parts: list[optax.GradientTransformation] = []
    if opt.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    if opt.weight_decay and opt.name not in ("adamw", "lion"):
        parts.append(optax.add_decayed_weights(opt.weight_decay))
    parts.append(_base(opt, lr_fn))
    plateau = None
    if schedule.name == "plateau":
        plateau = optax.contrib.reduce_on_plateau(
            factor=schedule.factor,
            patience=schedule.patience,
            rtol=schedule.rtol,
            atol=schedule.atol,
            cooldown=schedule.cooldown,
            # Eval-driven: every evaluation is one observation.
            accumulation_size=(
                schedule.accumulation_size if schedule.monitor == "train_loss" else 1
            ),
            min_scale=schedule.min_scale,
        )
    return Optimizer(
        tx=optax.chain(*parts) if len(parts) > 1 else parts[0],
        lr_fn=lr_fn,
        plateau=plateau,
        plateau_monitor=schedule.monitor if plateau is not None else None,
    )
