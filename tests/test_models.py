"""Tests for accelctl.models: the registry, output shapes, dropout and batch norm modes.

Shapes are shared between tests on purpose: every new parameter shape costs an eager compile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from accelctl import config, models

IMAGE = (8, 8, 1)  # MLP and CNN inputs
CLASSES = 4
BATCH = 4


def _model_cfg(text: str):
    return config.load_text(f"model: {text}", "x.yaml").model


def _build(text: str, input_shape=IMAGE, num_outputs: int = CLASSES, seed: int = 0):
    return models.build(_model_cfg(text), input_shape, num_outputs, rngs=nnx.Rngs(seed))


def _x(shape=(BATCH, *IMAGE), seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _cnn(pool: str = "max", batch_norm: bool = False, extra: str = "") -> str:
    bn = str(batch_norm).lower()
    return f"{{name: cnn, channels: [4, 4], pool: {pool}, batch_norm: {bn}, dense: [8]{extra}}}"


def test_registry_names() -> None:
    assert {"mlp", "cnn"} <= set(models.names())
    assert models.names() == sorted(models.names())


def test_register_refuses_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        models.register("mlp")(lambda *a: None)


def test_mlp_logits_shape_and_activations() -> None:
    x = _x()
    outs = {}
    for act in ("relu", "gelu", "silu", "tanh", "sigmoid"):
        model = _build(f"{{name: mlp, hidden: [8], activation: {act}}}")
        assert _num_params(model) == 64 * 8 + 8 + 8 * CLASSES + CLASSES
        out = model(x, train=False)
        assert out.shape == (BATCH, CLASSES)
        assert out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))
        outs[act] = np.asarray(out)
    # Same init seed, so only the activation differs: each one must change the output.
    assert not np.allclose(outs["relu"], outs["tanh"])
    assert not np.allclose(outs["gelu"], outs["silu"])


def test_seed_mnist_mlp_parameter_count() -> None:
    # Abstract init: counts the parameters without computing (or compiling) their values.
    cfg = _model_cfg("{name: mlp, hidden: [64], activation: relu}")
    model = nnx.eval_shape(lambda: models.build(cfg, (28, 28), 10, rngs=nnx.Rngs(0)))
    assert _num_params(model) == 784 * 64 + 64 + 64 * 10 + 10
    shapes = sorted(p.shape for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert shapes == sorted([(784, 64), (64,), (64, 10), (10,)])


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_cnn_logits_shape(pool: str, batch_norm: bool) -> None:
    model = _build(_cnn(pool, batch_norm))
    for train in (False, True):
        out = model(_x(), train=train)
        assert out.shape == (BATCH, CLASSES)
        assert bool(jnp.all(jnp.isfinite(out)))
    # The dense head's input width follows the pooling: 8x8 → 4x4 → 2x2, or 8x8 kept.
    side = 8 if pool == "none" else 2
    assert model.dense[0].kernel.shape == (side * side * 4, 8)
    assert any(isinstance(n, nnx.BatchNorm) for n in model.norms) == batch_norm
    assert (model.convs[0].bias is None) == batch_norm  # the norm's bias replaces the conv's


def test_cnn_pool_kinds_differ() -> None:
    x = _x()
    outs = [np.asarray(_build(_cnn(pool))(x, train=False)) for pool in ("max", "avg")]
    assert not np.allclose(*outs)


def test_cnn_2d_inputs_get_a_channel_axis() -> None:
    text = _cnn(extra=", kernels: [3, 3]")
    model = _build(text, input_shape=IMAGE[:2])
    assert model.convs[0].kernel.shape == (3, 3, 1, 4)
    x = _x()
    out = model(x[..., 0], train=False)
    assert out.shape == (BATCH, CLASSES)
    # Same seed and shapes as the (H, W, 1) model: the same function.
    np.testing.assert_allclose(out, _build(text)(x, train=False), rtol=1e-5, atol=1e-6)


def test_cnn_odd_and_tiny_maps_pool_like_the_head_expects() -> None:
    # 5x3 → 2x1 → 1x1: the head width computed at init must match the call.
    model = _build(_cnn("avg"), input_shape=(5, 3, 1))
    assert model(_x((BATCH, 5, 3, 1)), train=False).shape == (BATCH, CLASSES)


def test_cnn_rejects_non_image_inputs() -> None:
    with pytest.raises(ValueError, match="image inputs"):
        _build("{name: cnn}", input_shape=(16,))


def test_same_seed_same_params_different_seed_different() -> None:
    text = "{name: mlp, hidden: [8]}"
    a, b, c = _build(text), _build(text), _build(text, seed=1)
    x = _x()
    np.testing.assert_array_equal(a(x, train=False), b(x, train=False))
    assert not np.allclose(a(x, train=False), c(x, train=False))


# ------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize(
    "text",
    ["{name: mlp, hidden: [8], dropout: 0.5}", _cnn(extra=", dropout: 0.5")],
    ids=["mlp", "cnn"],
)
def test_dropout_train_vs_eval(text: str) -> None:
    model = _build(text)
    no_dropout = _build(text.replace("dropout: 0.5", "dropout: 0.0"))
    x = _x()
    t1 = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    t1_again = model(x, train=True, rngs=nnx.Rngs(dropout=1))
    t2 = model(x, train=True, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(t1, t1_again)  # the key decides the mask
    assert not np.allclose(t1, t2)
    e1, e2 = model(x, train=False), model(x, train=False)
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(t1, e1)
    # Eval mode is the plain network: the same as training a dropout-0 twin (same init seed).
    ref = no_dropout(x, train=True, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_allclose(e1, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- batch norm
def _stats(model: nnx.Module) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(params, batch stats) as numpy copies, via nnx.split."""
    _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return (
        [np.array(v) for v in jax.tree.leaves(params)],
        [np.array(v) for v in jax.tree.leaves(stats)],
    )


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_batch_norm_train_updates_running_stats() -> None:
    model = _build(_cnn("none", True))
    params0, stats0 = _stats(model)
    assert len(stats0) == 4  # running mean and var of each of the two norms
    norm = model.norms[0]
    np.testing.assert_array_equal(norm.mean[...], 0.0)
    np.testing.assert_array_equal(norm.var[...], 1.0)
    x = 3.0 + 2.0 * _x()
    model(x, train=True)
    params1, stats1 = _stats(model)
    _assert_same(params0, params1)  # a forward pass never changes parameters
    for before, after in zip(stats0, stats1, strict=True):
        assert not np.allclose(before, after)
    # momentum 0.9: running = 0.9 * running + 0.1 * batch statistic of the conv output.
    conv_out = model.convs[0](x)
    np.testing.assert_allclose(
        norm.mean[...], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        norm.var[...], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )


def test_batch_norm_eval_uses_running_averages_and_keeps_them() -> None:
    model = _build(_cnn("max", True))
    x = 3.0 + 2.0 * _x()
    for _ in range(3):
        model(x, train=True)
    _, stats_before = _stats(model)
    full = model(x, train=False)
    _, stats_after = _stats(model)
    _assert_same(stats_before, stats_after)
    # Running statistics make each example's output independent of the rest of the batch.
    np.testing.assert_allclose(model(x[:2], train=False), full[:2], rtol=1e-5, atol=1e-6)
    # And eval follows the running statistics: changing them changes the output.
    norm = model.norms[0]
    mean = norm.mean[...]
    norm.mean[...] = mean + 1.0
    assert not np.allclose(model(x, train=False), full, atol=1e-4)
    norm.mean[...] = mean
    np.testing.assert_allclose(model(x, train=False), full, rtol=1e-5, atol=1e-6)
    # Train mode normalises with the statistics of the batch it is given instead.
    assert not np.allclose(model(x[:2], train=True), full[:2], atol=1e-4)
