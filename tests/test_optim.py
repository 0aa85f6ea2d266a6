"""Tests for accelctl.optim (optimizers, schedules, plateau) and accelctl.train.losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from accelctl import config, optim
from accelctl.train import losses


def _opt(text: str, total_steps: int = 100) -> optim.Optimizer:
    cfg = config.load_text(text, "x.yaml")
    return optim.build(cfg.optimizer, cfg.schedule, total_steps)


def _lr(schedule: str, lr: float = 0.5, total_steps: int = 100):
    return _opt(f"optimizer: {{name: sgd, lr: {lr}}}\nschedule: {schedule}", total_steps).lr_fn


# --------------------------------------------------------------------------------- optimizers
TARGET = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}


def _quadratic(params: dict[str, jax.Array]) -> jax.Array:
    return sum(jnp.sum((params[k] - TARGET[k]) ** 2) for k in TARGET)


OPTIMIZERS = [
    "{name: sgd, lr: 0.1}",
    "{name: sgd, lr: 0.05, momentum: 0.9}",
    "{name: sgd, lr: 0.05, momentum: 0.9, nesterov: true}",
    "{name: adam, lr: 0.1}",
    "{name: adamw, lr: 0.1}",
    "{name: adagrad, lr: 0.5}",
    "{name: rmsprop, lr: 0.1}",
    "{name: rmsprop, lr: 0.05, momentum: 0.5}",
    "{name: lion, lr: 0.1}",
]
EXTRAS = {"plain": "", "wd": ", weight_decay: 0.01", "clip": ", clip_norm: 0.5"}
EXTRAS["wd+clip"] = EXTRAS["wd"] + EXTRAS["clip"]


def _minimise(opt: optim.Optimizer, steps: int = 50) -> tuple[float, float]:
    params = {"w": jnp.zeros(3), "b": jnp.array(2.0)}
    return float(_quadratic(params)), float(_quadratic(_run(opt.tx, params, steps)))


def _run(tx: optax.GradientTransformation, params, steps: int):
    """`steps` updates of `tx` on the quadratic, as one compiled loop."""

    @jax.jit
    def run(params):
        def body(_, carry):
            p, s = carry
            _, g = jax.value_and_grad(_quadratic)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    return run(params)


@pytest.mark.parametrize("extra", list(EXTRAS.values()), ids=list(EXTRAS))
@pytest.mark.parametrize("opt_text", OPTIMIZERS, ids=lambda t: t[7:].split("}")[0])
def test_every_optimizer_decreases_a_quadratic(opt_text: str, extra: str) -> None:
    opt = _opt(f"optimizer: {opt_text[:-1]}{extra}}}")
    start, end = _minimise(opt)
    assert np.isfinite(end)
    assert end < 0.1 * start, (start, end)
    assert opt.plateau is None and opt.plateau_monitor is None


def test_weight_decay_is_l2_for_sgd() -> None:
    # Gradient 2 (w - t) + wd * w vanishes at w = 2 t / (2 + wd): the minimum moves toward 0.
    opt = _opt("optimizer: {name: sgd, lr: 0.1, weight_decay: 1.0}")
    params = _run(opt.tx, {k: jnp.zeros_like(v) for k, v in TARGET.items()}, 200)
    for k in TARGET:
        np.testing.assert_allclose(params[k], TARGET[k] * 2 / 3, rtol=1e-4, atol=1e-5)


def test_weight_decay_decoupled_for_adamw_and_lion_coupled_for_adam() -> None:
    params = {"w": jnp.array([2.0, -4.0])}
    zero = {"w": jnp.zeros(2)}
    for name in ("adamw", "lion"):
        opt = _opt(f"optimizer: {{name: {name}, lr: 0.1, weight_decay: 0.5}}")
        u, _ = opt.tx.update(zero, opt.tx.init(params), params)
        # Decoupled: with a zero gradient the step is exactly -lr * wd * w.
        np.testing.assert_allclose(u["w"], -0.1 * 0.5 * params["w"], rtol=1e-5)
    opt = _opt("optimizer: {name: adam, lr: 0.1, weight_decay: 0.5}")
    u, _ = opt.tx.update(zero, opt.tx.init(params), params)
    # Coupled L2: wd * w goes through Adam's normalisation, so the first step is -lr * sign(w).
    np.testing.assert_allclose(u["w"], -0.1 * jnp.sign(params["w"]), rtol=1e-5)


def test_clip_norm_bounds_the_update() -> None:
    opt = _opt("optimizer: {name: sgd, lr: 1.0, clip_norm: 0.1}")
    params = {"w": jnp.array([30.0, -40.0])}
    grads = {"w": jnp.array([3.0, -4.0])}  # norm 5
    u, _ = opt.tx.update(grads, opt.tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * grads["w"] / 5.0, rtol=1e-5)
    small = {"w": jnp.array([0.03, 0.04])}  # norm 0.05: left as is
    u, _ = opt.tx.update(small, opt.tx.init(params), params)
    np.testing.assert_allclose(u["w"], -small["w"], rtol=1e-5)


def test_sgd_momentum_and_nesterov_differ_from_plain() -> None:
    params = {"w": jnp.array([1.0])}
    g = {"w": jnp.array([1.0])}
    steps = {}
    for text in OPTIMIZERS[:3]:
        opt = _opt(f"optimizer: {text}")
        state = opt.tx.init(params)
        u1, state = opt.tx.update(g, state, params)
        u2, state = opt.tx.update(g, state, params)
        steps[text] = float(u2["w"][0]) / opt.lr_fn(0)
    plain, mom, nest = steps.values()
    assert plain == pytest.approx(-1.0)
    assert mom == pytest.approx(-1.9)  # trace = g + 0.9 g
    assert nest == pytest.approx(-(1.0 + 0.9 * 1.9))  # g + 0.9 * trace


# --------------------------------------------------------------------------------- schedules
def _at(fn, *steps: int) -> list[float]:
    return [float(fn(s)) for s in steps]


def test_constant_schedule() -> None:
    fn = _lr("{name: constant}")
    assert _at(fn, 0, 1, 50, 100, 10_000) == pytest.approx([0.5] * 5)


def test_warmup_then_constant() -> None:
    fn = _lr("{name: constant, warmup_steps: 10}")
    assert _at(fn, 0, 5, 10, 11, 99) == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5])


def test_schedule_is_traceable() -> None:
    fn = _lr("{name: cosine, warmup_steps: 10, end_factor: 0.1}")
    jitted = jax.jit(fn)
    for s in (0, 5, 10, 60, 100):
        assert float(jitted(jnp.int32(s))) == pytest.approx(float(fn(s)), rel=1e-6)


@pytest.mark.parametrize("warmup", [0, 20])
def test_linear_decays_to_end_factor(warmup: int) -> None:
    fn = _lr(f"{{name: linear, end_factor: 0.1, warmup_steps: {warmup}}}")
    mid = warmup + (100 - warmup) // 2
    got = _at(fn, warmup, mid, 100, 150)
    assert got == pytest.approx([0.5, 0.5 * 0.55, 0.05, 0.05], rel=1e-5)
    if warmup:
        assert _at(fn, 0, warmup // 2) == pytest.approx([0.0, 0.25])


@pytest.mark.parametrize("warmup", [0, 20])
def test_cosine_decays_to_end_factor(warmup: int) -> None:
    fn = _lr(f"{{name: cosine, end_factor: 0.2, warmup_steps: {warmup}}}")
    mid = warmup + (100 - warmup) // 2
    got = _at(fn, warmup, mid, 100, 150)
    # Halfway along a cosine the lr is the mean of the start and the end.
    assert got == pytest.approx([0.5, 0.5 * 0.6, 0.1, 0.1], rel=1e-5)
    values = _at(fn, *range(warmup, 101, 5))
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_piecewise_multiplies_at_boundaries() -> None:
    fn = _lr("{name: piecewise, boundaries: [10, 30], factors: [0.5, 0.1]}")
    got = _at(fn, 0, 9, 10, 29, 30, 99)
    assert got == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.025, 0.025])


def test_piecewise_boundaries_count_after_warmup() -> None:
    fn = _lr("{name: piecewise, warmup_steps: 5, boundaries: [10], factors: [0.5]}")
    assert _at(fn, 0, 5, 14, 15, 50) == pytest.approx([0.0, 0.5, 0.5, 0.25, 0.25])


def test_step_multiplies_by_gamma_every_n() -> None:
    fn = _lr("{name: step, step_every: 10, gamma: 0.5}")
    got = _at(fn, 0, 9, 10, 19, 20, 35)
    assert got == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.125, 0.0625])


def test_optimizer_follows_the_schedule() -> None:
    opt = _opt("optimizer: {name: sgd, lr: 1.0}\nschedule: {name: step, step_every: 2, gamma: 0.5}")
    params = {"w": jnp.zeros(1)}
    state = opt.tx.init(params)
    sizes = []
    for _ in range(5):
        u, state = opt.tx.update({"w": jnp.ones(1)}, state, params)
        sizes.append(-float(u["w"][0]))
    assert sizes == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])


# ---------------------------------------------------------------------------------- plateau
def _feed(opt: optim.Optimizer, values: list[float], state=None):
    assert opt.plateau is not None
    if state is None:
        state = opt.plateau.init({})
    update = jax.jit(lambda s, v: opt.plateau.update({}, s, value=v)[1])
    scales = []
    for v in values:
        state = update(state, jnp.float32(v))
        scales.append(float(state.scale))
    return scales, state


PLATEAU = "schedule: {name: plateau, patience: 1, factor: 0.5, monitor: eval_loss%s}"


def test_plateau_reduces_on_no_improvement() -> None:
    opt = _opt(PLATEAU % "")
    assert opt.plateau_monitor == "eval_loss"
    assert _at(opt.lr_fn, 0, 50) == pytest.approx([1e-3, 1e-3])  # base lr stays constant
    scales, state = _feed(opt, [1.0, 1.0, 1.0, 1.5])
    assert scales == pytest.approx([1.0, 0.5, 0.25, 0.125])
    # The scale multiplies the updates it is given.
    u, _ = opt.plateau.update({"w": jnp.ones(2)}, state, value=jnp.asarray(2.0))
    np.testing.assert_allclose(u["w"], 0.0625)


def test_plateau_keeps_scale_while_improving() -> None:
    scales, _ = _feed(_opt(PLATEAU % ""), [1.0, 0.9, 0.8, 0.5, 0.1, 0.01])
    assert scales == pytest.approx([1.0] * 6)


def test_plateau_stops_at_min_scale() -> None:
    scales, _ = _feed(_opt(PLATEAU % ", min_scale: 0.1"), [1.0] * 8)
    assert scales[-1] == pytest.approx(0.1)
    assert min(scales) == pytest.approx(0.1)


def test_plateau_cooldown_waits_after_a_reduction() -> None:
    scales, _ = _feed(_opt(PLATEAU % ", cooldown: 2"), [1.0] * 6)
    assert scales == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_plateau_eval_loss_ignores_accumulation_size() -> None:
    scales, _ = _feed(_opt(PLATEAU % ", accumulation_size: 3"), [1.0, 1.0])
    assert scales == pytest.approx([1.0, 0.5])


def test_plateau_train_loss_accumulates() -> None:
    text = "schedule: {name: plateau, patience: 1, factor: 0.5, monitor: train_loss, "
    opt = _opt(text + "accumulation_size: 3}")
    assert opt.plateau_monitor == "train_loss"
    # Window 1 (mean 1.0) sets the best value; window 2 (mean 1.0) does not improve.
    scales, state = _feed(opt, [0.5, 1.0, 1.5, 1.2, 0.8])
    assert scales == pytest.approx([1.0] * 5)
    assert int(state.count) == 2
    scales, state = _feed(opt, [1.0], state)
    assert scales == pytest.approx([0.5])
    assert int(state.count) == 0
    # A single low minibatch loss does not count as an improvement until its window closes.
    scales, _ = _feed(opt, [0.1, 5.0, 5.0], state)
    assert scales == pytest.approx([0.5, 0.5, 0.25])


def test_plateau_patience_zero_never_cuts_while_improving() -> None:
    # optax reads patience 0 as "cut on every improvement", so the config must refuse it.
    try:
        opt = _opt(PLATEAU.replace("patience: 1", "patience: 0") % "")
    except config.ConfigError as e:
        assert "patience" in str(e)
        return
    scales, _ = _feed(opt, [1.0, 0.9, 0.8])
    assert scales == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("tols", ["rtol: 0.0, atol: 0.0", "rtol: 1.5"])
def test_plateau_tolerances_checked_by_config(tols: str) -> None:
    with pytest.raises(config.ConfigError):
        _opt(PLATEAU % f", {tols}")


def test_no_plateau_for_other_schedules() -> None:
    opt = _opt("schedule: {name: cosine}")
    assert opt.plateau is None and opt.plateau_monitor is None


# ------------------------------------------------------------------------------------ losses
LOGITS = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 3.0], [1.0, 1.0, 1.0, 1.0]])
LABELS = jnp.array([0, 2, 1])


def test_cross_entropy_is_negative_log_softmax_at_label() -> None:
    got = losses.cross_entropy(LOGITS, LABELS, label_smoothing=0.0)
    want = -np.take_along_axis(np.asarray(jax.nn.log_softmax(LOGITS)), LABELS[:, None], 1)[:, 0]
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[2], np.log(4.0), rtol=1e-6)  # uniform logits


def test_cross_entropy_label_smoothing() -> None:
    alpha, k = 0.2, LOGITS.shape[1]
    got = losses.cross_entropy(LOGITS, LABELS, label_smoothing=alpha)
    logp = np.asarray(jax.nn.log_softmax(LOGITS))
    targets = (1 - alpha) * np.eye(k)[np.asarray(LABELS)] + alpha / k
    np.testing.assert_allclose(got, -(targets * logp).sum(1), rtol=1e-6)
    plain = losses.cross_entropy(LOGITS, LABELS, label_smoothing=0.0)
    # Uniform logits lose log K either way; a confident right answer costs more when smoothed.
    np.testing.assert_allclose(got[2], plain[2], rtol=1e-6)
    assert float(got[0]) > float(plain[0])


def test_cross_entropy_low_precision_logits_give_float32() -> None:
    got = losses.cross_entropy(LOGITS.astype(jnp.bfloat16), LABELS, label_smoothing=0.0)
    assert got.dtype == jnp.float32
    plain = losses.cross_entropy(LOGITS, LABELS, label_smoothing=0.0)
    np.testing.assert_allclose(got, plain, rtol=2e-2)


def test_mse_against_one_hot() -> None:
    got = losses.mse(LOGITS, LABELS)
    want = ((np.asarray(LOGITS) - np.eye(4)[np.asarray(LABELS)]) ** 2).mean(1)
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(losses.mse(jnp.eye(4), jnp.arange(4)).max()) == 0.0
    # label_smoothing is accepted (one signature for all losses) and ignored.
    np.testing.assert_allclose(losses.mse(LOGITS, LABELS, label_smoothing=0.3), got)


def test_correct() -> None:
    got = losses.correct(LOGITS, jnp.array([0, 3, 1]))
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0])  # ties pick the first class
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(losses.correct(LOGITS, LABELS), [1.0, 0.0, 0.0])


def test_losses_registry() -> None:
    assert losses.LOSSES == {"cross_entropy": losses.cross_entropy, "mse": losses.mse}
