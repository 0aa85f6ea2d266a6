"""Residual network (He et al. 2016): conv stem, stages of residual blocks, pool, dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from accelctl.models.layers import ACTIVATIONS, checkpointed


def _conv(c_in: int, c_out: int, k: int, stride: int, rngs: nnx.Rngs, dtype: Any) -> nnx.Conv:
    # No bias: every conv is followed by a batch norm, whose bias takes its place.
    return nnx.Conv(
        c_in, c_out, (k, k), strides=stride, padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
    )


def _norm(ch: int, rngs: nnx.Rngs, dtype: Any, *, zero_scale: bool = False) -> nnx.BatchNorm:
    # Flax computes the batch statistics in float32 and keeps the running ones in float32.
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    return nnx.BatchNorm(ch, momentum=0.9, scale_init=scale_init, dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """Residual block act(F(x) + shortcut(x)); F is basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1).

    Args:
        c_in: input channels.
        ch: block width; a bottleneck block outputs 4 * ch channels, a basic one ch.
        stride: stride of the first 3x3 conv (and of the projection shortcut).
        bottleneck: use the bottleneck form.
        zero_init_residual: start the last batch-norm scale at 0, so the block is act(shortcut).
        activation: name in ACTIVATIONS.
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        c_in: int,
        ch: int,
        stride: int,
        *,
        bottleneck: bool,
        zero_init_residual: bool,
        activation: str,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        # (kernel, channels, stride) per conv; the bottleneck strides in its 3x3 conv (v1.5).
        if bottleneck:
            layers = [(1, ch, 1), (3, ch, stride), (1, 4 * ch, 1)]
        else:
            layers = [(3, ch, stride), (3, ch, 1)]
        convs, norms, c = [], [], c_in
        for i, (k, c_out, s) in enumerate(layers):
            convs.append(_conv(c, c_out, k, s, rngs, dtype))
            last = i == len(layers) - 1
            norms.append(_norm(c_out, rngs, dtype, zero_scale=zero_init_residual and last))
            c = c_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        # The identity can only be added when the shape is unchanged; otherwise project.
        needs_proj = stride != 1 or c_in != c
        self.proj = _conv(c_in, c, 1, stride, rngs, dtype) if needs_proj else None
        self.proj_norm = _norm(c, rngs, dtype) if needs_proj else None
        self.activation = activation
        self.out_channels = c

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Return the block output (batch, H / stride, W / stride, out_channels)."""
        act = ACTIVATIONS[self.activation]
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            y = norm(conv(y), use_running_average=not train)
            if i < len(self.convs) - 1:
                y = act(y)
        shortcut = x
        if self.proj is not None and self.proj_norm is not None:
            shortcut = self.proj_norm(self.proj(x), use_running_average=not train)
        return act(y + shortcut)


class ResNet(nnx.Module):
    """ResNet over NHWC images; a (H, W) input gets a channel axis added.

    Args:
        input_shape: shape of one example, (H, W) or (H, W, C).
        stage_sizes: blocks per stage; stage i has width * 2**i channels (x4 for bottleneck).
        width: channels of the stem and the first stage.
        block: "basic" or "bottleneck".
        stem: "cifar" (3x3 conv) or "imagenet" (7x7 conv stride 2, 3x3 max pool stride 2).
        zero_init_residual: start each block's last batch-norm scale at 0.
        num_outputs: number of logits.
        activation: name in ACTIVATIONS.
        remat: activation checkpointing per residual block (none, full, dots, offload; see
            `layers.remat_policy`); dots keeps nothing more than full here, as convolutions are
            not dots.
        dtype: compute dtype (None: float32); parameters stay float32.
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        *,
        stage_sizes: Sequence[int],
        width: int,
        block: str,
        stem: str,
        zero_init_residual: bool,
        num_outputs: int,
        activation: str = "relu",
        remat: str = "none",
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        shape = list(input_shape) if len(input_shape) == 3 else [*input_shape, 1]
        if len(shape) != 3:
            raise ValueError(f"resnet needs image inputs (H, W[, C]); got {tuple(input_shape)}")
        if block not in ("basic", "bottleneck") or stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown resnet block {block!r} or stem {stem!r}")
        k, s = (3, 1) if stem == "cifar" else (7, 2)
        self.stem_conv = _conv(shape[2], width, k, s, rngs, dtype)
        self.stem_norm = _norm(width, rngs, dtype)
        blocks, c = [], width
        for i, size in enumerate(stage_sizes):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blk = Block(
                    c,
                    width * 2**i,
                    stride,
                    bottleneck=block == "bottleneck",
                    zero_init_residual=zero_init_residual,
                    activation=activation,
                    dtype=dtype,
                    rngs=rngs,
                )
                blocks.append(blk)
                c = blk.out_channels
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c, num_outputs, dtype=dtype, rngs=rngs)
        self.stem = stem
        self.activation = activation
        self.image_ndim = len(input_shape)
        self.remat = remat

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return logits (batch, num_outputs) for images (batch, H, W[, C]).

        Args:
            x: float32 images.
            train: normalise with batch statistics and update the running ones.
            rngs: unused (no dropout); accepted for the common model signature.
        Returns:
            Logits (batch, num_outputs).
        """
        if self.image_ndim == 2:
            x = x[..., None]
        x = self.stem_conv(x)
        x = ACTIVATIONS[self.activation](self.stem_norm(x, use_running_average=not train))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        def run_block(blk: Block, x: jax.Array) -> jax.Array:
            return blk(x, train=train)

        # One checkpoint per block: the backward pass recomputes a block's convolutions and
        # batch norms from its input (the running statistics are updated once, in the forward).
        block_fn = checkpointed(run_block, self.remat)
        for blk in self.blocks:
            x = block_fn(blk, x)
        return self.head(jnp.mean(x, axis=(1, 2)))
