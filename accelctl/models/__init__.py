"""Models by name: `model: {name: mlp, ...}` in the config picks a builder from the registry.

Every model is a Flax NNX module called as `model(x, train=..., rngs=...)` and returns logits of
shape (batch, num_outputs). Inputs arrive already normalised to float32; the transformer instead
takes integer token ids (batch, T) and returns per-position logits (batch, T, vocab).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from accelctl.models.cnn import CNN
from accelctl.models.mlp import MLP
from accelctl.models.resnet import ResNet
from accelctl.models.transformer import Transformer

BuildFn = Callable[[Any, tuple[int, ...], int, nnx.Rngs, Any], nnx.Module]

_REGISTRY: dict[str, BuildFn] = {}


def register(name: str) -> Callable[[BuildFn], BuildFn]:
    """Register a builder `fn(model_cfg, input_shape, num_outputs, rngs, dtype) -> nnx.Module`."""

    def wrap(fn: BuildFn) -> BuildFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    """Return the registered model names."""
    return sorted(_REGISTRY)


def build(
    cfg: Any,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
) -> nnx.Module:
    """Build the model named by `cfg.name`.

    Args:
        cfg: the `model` config section (MLPConfig, CNNConfig, ResNetConfig, ...).
        input_shape: shape of one example, without the batch dimension.
        num_outputs: number of logits (classes; the vocabulary size for the transformer).
        rngs: parameter initialisation keys.
        dtype: compute dtype of the layers (None: float32); parameters are always float32.
    Returns:
        The initialised NNX module.
    """
    # Weights' `out_sharding` metadata holds logical names, not mesh axes: Flax must not try to
    # place them at creation (accelctl places the whole state with its own shardings).
    with nnx.use_eager_sharding(False):
        return _REGISTRY[cfg.name](cfg, input_shape, num_outputs, rngs, dtype)


@register("mlp")
def _build_mlp(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> MLP:
    return MLP(
        input_shape,
        cfg.hidden,
        num_outputs,
        activation=cfg.activation,
        dropout=cfg.dropout,
        dtype=dtype,
        rngs=rngs,
    )


@register("cnn")
def _build_cnn(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> CNN:
    kernels = cfg.kernels if isinstance(cfg.kernels, tuple) else (cfg.kernels,) * len(cfg.channels)
    return CNN(
        input_shape,
        channels=cfg.channels,
        kernels=kernels,
        pool=cfg.pool,
        batch_norm=cfg.batch_norm,
        dense=cfg.dense,
        num_outputs=num_outputs,
        activation=cfg.activation,
        dropout=cfg.dropout,
        dtype=dtype,
        rngs=rngs,
    )


@register("resnet")
def _build_resnet(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> ResNet:
    return ResNet(
        input_shape,
        stage_sizes=cfg.stage_sizes,
        width=cfg.width,
        block=cfg.block,
        stem=cfg.stem,
        zero_init_residual=cfg.zero_init_residual,
        num_outputs=num_outputs,
        activation=cfg.activation,
        dtype=dtype,
        rngs=rngs,
    )


@register("transformer")
def _build_transformer(
    cfg: Any, input_shape: tuple[int, ...], num_outputs: int, rngs: nnx.Rngs, dtype: Any
) -> Transformer:
    return Transformer(
        input_shape,
        num_outputs,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        embed_dim=cfg.embed_dim,
        mlp_dim=cfg.mlp_dim,
        max_len=cfg.max_len,
        positions=cfg.positions,
        tie_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout,
        dtype=dtype,
        rngs=rngs,
    )
