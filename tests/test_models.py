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
from accelctl.models.layers import pool2x2

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


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 5, 3), (2, 1, 5, 2), (2, 1, 1, 2)])
def test_pool2x2_equals_flax_pooling_values_and_gradients(kind: str, shape) -> None:
    # Random inputs have no ties, so even the max gradient (shared among ties) must match.
    flax_pool = nnx.max_pool if kind == "max" else nnx.avg_pool
    window = tuple(2 if d >= 2 else 1 for d in shape[1:3])
    x = _x(shape)

    def ours(x):
        return pool2x2(x, kind)

    def theirs(x):
        return flax_pool(x, window, strides=window)

    np.testing.assert_array_equal(ours(x), theirs(x))
    w = _x(ours(x).shape, seed=1)  # a cotangent that is not all ones
    g_ours = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
    g_theirs = jax.grad(lambda x: jnp.sum(theirs(x) * w))(x)
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-6, atol=1e-7)


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


# ------------------------------------------------------------------------------------- resnet
RGB = (8, 8, 3)  # ResNet inputs


def _resnet(block: str = "basic", stem: str = "cifar", extra: str = "") -> str:
    return f"{{name: resnet, stage_sizes: [1, 1], width: 4, block: {block}, stem: {stem}{extra}}}"


def _build_resnet(text: str, input_shape=RGB, seed: int = 0):
    # rbg keys: on CPU each new kernel shape compiles its initialiser, ~5x faster than threefry.
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    return models.build(_model_cfg(text), input_shape, CLASSES, rngs=rngs)


def _resnet_num_params(
    stage_sizes: tuple[int, ...], width: int, block: str, c_in: int, classes: int
) -> int:
    """Parameters of the cifar-stem ResNet, from the architecture: bias-free convs, BN, head."""

    def conv(k: int, a: int, b: int) -> int:
        return k * k * a * b

    def bn(c: int) -> int:
        return 2 * c  # scale and bias

    total, c = conv(3, c_in, width) + bn(width), width
    for i, size in enumerate(stage_sizes):
        ch = width * 2**i
        for _ in range(size):
            if block == "basic":
                out = ch
                total += conv(3, c, ch) + bn(ch) + conv(3, ch, ch) + bn(ch)
            else:
                out = 4 * ch
                total += conv(1, c, ch) + conv(3, ch, ch) + conv(1, ch, out) + bn(ch) * 2 + bn(out)
            if c != out:  # projection shortcut (the first block of each stage)
                total += conv(1, c, out) + bn(out)
            c = out
    return total + c * classes + classes


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_logits_shape(block: str, stem: str) -> None:
    # Shapes only: the model and its forward pass are traced abstractly (nothing is computed);
    # the values are checked by the batch-norm and zero-init tests below.
    model = nnx.eval_shape(lambda: _build_resnet(_resnet(block, stem)))
    assert isinstance(model, models.ResNet)
    x = jax.ShapeDtypeStruct((BATCH, *RGB), jnp.float32)
    for train in (False, True):
        out = nnx.eval_shape(lambda m, x, train=train: m(x, train=train), model, x)
        assert out.shape == (BATCH, CLASSES) and out.dtype == jnp.float32
    expansion = 4 if block == "bottleneck" else 1
    assert model.head.kernel.shape == (8 * expansion, CLASSES)  # stage widths 4, then 8
    assert model.stem_conv.kernel.shape == ((3, 3) if stem == "cifar" else (7, 7)) + (3, 4)
    assert model.stem_conv.bias is None  # every conv is followed by a batch norm
    # The second stage starts with a strided block; its shape change needs a projection.
    assert model.blocks[1].proj is not None and model.blocks[1].proj.strides == 2
    assert max(c.strides for c in model.blocks[0].convs) == 1
    assert (model.blocks[0].proj is None) == (block == "basic")


def test_resnet_2d_inputs_get_a_channel_axis() -> None:
    model = _build_resnet(_resnet(), input_shape=IMAGE[:2])
    assert model.stem_conv.kernel.shape == (3, 3, 1, 4)
    x = _x()
    out = model(x[..., 0], train=False)
    assert out.shape == (BATCH, CLASSES)
    # Same seed and shapes as the (H, W, 1) model: the same function.
    np.testing.assert_allclose(
        out, _build_resnet(_resnet(), input_shape=IMAGE)(x, train=False), rtol=1e-5, atol=1e-6
    )


def test_resnet_rejects_non_image_inputs() -> None:
    with pytest.raises(ValueError, match="image inputs"):
        _build_resnet(_resnet(), input_shape=(16,))


def test_resnet20_parameter_count() -> None:
    # The defaults are ResNet-20 (He et al. 2016, CIFAR-10): 0.27M parameters. Abstract init.
    cfg = _model_cfg("{name: resnet}")
    assert (cfg.stage_sizes, cfg.width, cfg.block, cfg.stem) == ((3, 3, 3), 16, "basic", "cifar")
    model = nnx.eval_shape(lambda: models.build(cfg, (32, 32, 3), 10, rngs=nnx.Rngs(0)))
    n = _num_params(model)
    assert n == _resnet_num_params((3, 3, 3), 16, "basic", 3, 10)
    assert n == 272_474  # with 1x1 projection shortcuts (option B); zero-padding ones: 269,722
    assert 0.26e6 < n < 0.28e6
    # 19 batch norms (stem + 2 per block), plus one per projection: running mean and var.
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert len(stats) == 2 * (1 + 2 * 9 + 2)


def test_resnet_bottleneck_parameter_count() -> None:
    cfg = _model_cfg(_resnet("bottleneck"))
    model = nnx.eval_shape(lambda: models.build(cfg, RGB, CLASSES, rngs=nnx.Rngs(0)))
    assert _num_params(model) == _resnet_num_params((1, 1), 4, "bottleneck", 3, CLASSES)


def test_resnet_batch_norm_train_vs_eval() -> None:
    model = _build_resnet(_resnet())
    x = 3.0 + 2.0 * _x((BATCH, *RGB))
    params0, stats0 = _stats(model)
    assert len(stats0) == 2 * 6  # stem, 2 + 2 in the blocks, 1 projection
    full = model(x, train=False)
    _, stats1 = _stats(model)
    _assert_same(stats0, stats1)  # eval never touches the running statistics
    # Eval normalises with running statistics: each example is independent of the batch.
    np.testing.assert_allclose(model(x[:1], train=False), full[:1], rtol=1e-5, atol=1e-6)
    train = model(x, train=True)
    params2, stats2 = _stats(model)
    _assert_same(params0, params2)
    for before, after in zip(stats0, stats2, strict=True):
        assert not np.allclose(before, after)
    # Train mode normalises with the batch's own statistics: the other examples matter.
    assert not np.allclose(model(x[:1], train=True), train[:1], atol=1e-4)
    # And the updated running statistics change what eval computes.
    assert not np.allclose(model(x, train=False), full, atol=1e-4)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_zero_init_residual_blocks_start_as_act_of_shortcut(block: str) -> None:
    model = _build_resnet(_resnet(block))
    h = _x((BATCH, 8, 8, 4), seed=1)  # the stem's output shape
    for blk in model.blocks:
        np.testing.assert_array_equal(blk.norms[-1].scale[...], 0.0)
        for norm in blk.norms[:-1]:
            np.testing.assert_array_equal(norm.scale[...], 1.0)
        out = blk(h, train=False)
        shortcut = h if blk.proj is None else blk.proj_norm(blk.proj(h), use_running_average=True)
        np.testing.assert_allclose(out, jax.nn.relu(shortcut), rtol=1e-6, atol=1e-6)
        h = out
    plain = _build_resnet(_resnet(block, extra=", zero_init_residual: false"))
    for blk in plain.blocks:
        np.testing.assert_array_equal(blk.norms[-1].scale[...], 1.0)


def test_resnet_builds_from_config_object() -> None:
    assert "resnet" in models.names()
    cfg = config.ResNetConfig(
        name="resnet",
        stage_sizes=(1, 1),
        width=4,
        block="bottleneck",
        stem="imagenet",
        zero_init_residual=False,
        activation="tanh",
    )
    model = models.build(cfg, RGB, CLASSES, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    assert isinstance(model, models.ResNet)
    assert model.stem_conv.kernel.shape == (7, 7, 3, 4)
    assert [len(b.convs) for b in model.blocks] == [3, 3]
    assert model.head.kernel.shape == (32, CLASSES)
    assert model.activation == "tanh" and all(b.activation == "tanh" for b in model.blocks)
    np.testing.assert_array_equal(model.blocks[-1].norms[-1].scale[...], 1.0)
    assert model(_x((BATCH, *RGB)), train=False).shape == (BATCH, CLASSES)


# --- activation checkpointing (model.remat) ------------------------------------------------------

REMAT_IMAGES = """
data: {source: synthetic, shape: [8, 8, 3], num_train: 256, num_eval: 64, num_classes: 4,
       cache: host}
optimizer: {name: adam, lr: 0.01}
train: {batch_size: 32, steps: 3}
"""


def remat_losses(text: str, remat: str, steps: int = 3) -> list[float]:
    """Losses of `steps` train steps of the config `text` under model.remat `remat` (dropout
    and batch statistics as in training; each step sees the state the previous one updated)."""
    from accelctl import data
    from accelctl.train.job import build_job

    job = build_job(config.load_text(text, "remat.yaml", [f"model.remat={remat}"]))
    state, losses = job.state.init(), []
    for step in range(steps):
        (batch,) = data.train_batches(
            job.dataset.train, job.sizes.batch, seed=0, start_step=step, num_steps=step + 1
        )
        state, metrics = job.steps.train(state, job.feed.train_put_fn(batch))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize(
    ("model", "modes"),
    [
        ("{name: mlp, hidden: [32, 16], dropout: 0.1}", ["full", "dots"]),
        ("{name: cnn, channels: [8, 8], dense: [16], batch_norm: true, dropout: 0.1}", ["full"]),
        ("{name: resnet, stage_sizes: [1, 1], width: 8}", ["full", "dots"]),
    ],
    ids=["mlp", "cnn", "resnet"],
)
def test_remat_keeps_the_losses(model: str, modes: list[str]) -> None:
    """Recomputing activations in the backward pass changes no loss and no update (the losses
    after the first step depend on the updates)."""
    text = f"model: {model}\n{REMAT_IMAGES}"
    plain = remat_losses(text, "none")
    for mode in modes:
        np.testing.assert_allclose(remat_losses(text, mode), plain, rtol=1e-6, atol=1e-6)


def test_resnet_remat_lowers_the_compiled_temporary_memory() -> None:
    from accelctl import plan

    text = """
model: {name: resnet, stage_sizes: [2, 2], width: 8}
data: {source: synthetic, shape: [16, 16, 3], num_train: 256, num_eval: 64, num_classes: 4,
       cache: host}
train: {batch_size: 64, steps: 3}
"""
    temp = {}
    for mode in ("none", "full"):
        job, _ = plan.build_abstract_job(config.load_text(text, "r.yaml", [f"model.remat={mode}"]))
        temp[mode] = plan.compile_train_step(job).memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.9 * temp["none"], temp


def test_remat_is_per_block_for_resnet_and_transformer_else_around_the_forward() -> None:
    for text, whole in [
        ("{name: mlp, remat: full}", "full"),
        ("{name: cnn, remat: dots}", "dots"),
        ("{name: resnet, remat: full}", "none"),
        ("{name: transformer, remat: full}", "none"),
    ]:
        cfg = _model_cfg(text)
        assert models.forward_remat(cfg) == whole
    assert _build("{name: resnet, remat: dots}", RGB).remat == "dots"
    with pytest.raises(config.ConfigError, match="remat"):
        _model_cfg("{name: mlp, remat: sometimes}")
