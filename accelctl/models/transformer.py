"""Decoder-only transformer (GPT-2 layout): token + position embeddings, pre-norm blocks of
causal self-attention and a gelu MLP, a final LayerNorm and logits over the vocabulary.

Weights name their axes Megatron-style, so tensor parallelism splits each block with two
all-reduces: q/k/v and the MLP input are column-split ("embed", "heads" / "mlp"), the attention
and MLP outputs row-split ("heads" / "mlp", "embed").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from accelctl.models.layers import logical

_INIT = nnx.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon


def _linear(
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    *,
    bias_axis: str | None,
    init: Any = _INIT,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        kernel_init=init,
        bias_init=nnx.initializers.zeros,
        kernel_metadata=logical(*axes),
        bias_metadata=logical(bias_axis),
        rngs=rngs,
    )


def _layer_norm(dim: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        epsilon=_LN_EPS,
        dtype=dtype,
        scale_metadata=logical("embed"),
        bias_metadata=logical("embed"),
        rngs=rngs,
    )


def apply_rotary(x: jax.Array) -> jax.Array:
    """Rotate query or key vectors by their position (RoPE, Su et al. 2021; half-split form).

    Args:
        x: (batch, T, heads, head_dim) with an even head_dim.
    Returns:
        Same shape and dtype; pairs (i, i + head_dim/2) rotated by angle pos * 10000^(-2i/d).
    """
    _, t, _, d = x.shape
    half = d // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]  # (T, d/2)
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    # The angles are float32 whatever the compute dtype: bf16 cannot resolve large positions.
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention through `jax.nn.dot_product_attention`.

    Args:
        embed_dim: model width; split into num_heads heads of embed_dim / num_heads.
        num_heads: attention heads.
        rotary: rotate q and k by position (RoPE) instead of relying on learned positions.
        out_init: initialiser of the output projection (scaled for the residual stream).
        dtype: compute dtype (None: float32); parameters stay float32.
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        rotary: bool,
        out_init: Any,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        def column() -> nnx.Linear:
            return _linear(
                embed_dim, embed_dim, ("embed", "heads"), bias_axis="heads", dtype=dtype, rngs=rngs
            )

        self.query, self.key, self.value = column(), column(), column()
        self.out = _linear(
            embed_dim,
            embed_dim,
            ("heads", "embed"),
            bias_axis=None,
            init=out_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.rotary = rotary

    def __call__(self, x: jax.Array) -> jax.Array:
        """Return (batch, T, embed_dim) for x (batch, T, embed_dim); position t sees 0..t."""
        b, t, _ = x.shape

        def heads(proj: nnx.Linear) -> jax.Array:
            return proj(x).reshape(b, t, self.num_heads, self.head_dim)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(b, t, self.num_heads * self.head_dim))


class Block(nnx.Module):
    """Pre-norm block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x))).

    Args:
        embed_dim, num_heads, rotary: as in `Attention`.
        mlp_dim: hidden width of the MLP.
        dropout: dropout rate on both residual branches (train only).
        out_init: initialiser of the two residual output projections.
        dtype: compute dtype (None: float32).
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rotary: bool,
        dropout: float,
        out_init: Any,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.ln1 = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(
            embed_dim, num_heads, rotary=rotary, out_init=out_init, dtype=dtype, rngs=rngs
        )
        self.ln2 = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.mlp_in = _linear(
            embed_dim, mlp_dim, ("embed", "mlp"), bias_axis="mlp", dtype=dtype, rngs=rngs
        )
        self.mlp_out = _linear(
            mlp_dim,
            embed_dim,
            ("mlp", "embed"),
            bias_axis=None,
            init=out_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return (batch, T, embed_dim) for x of the same shape."""
        drop = {"deterministic": not train, "rngs": rngs}
        x = x + self.dropout(self.attn(self.ln1(x)), **drop)
        h = jax.nn.gelu(self.mlp_in(self.ln2(x)))
        return x + self.dropout(self.mlp_out(h), **drop)


class Transformer(nnx.Module):
    """GPT-style language model over integer token ids.

    Args:
        input_shape: shape of one example, (T,) token ids; T must be <= max_len.
        num_outputs: vocabulary size (token ids are 0..num_outputs-1; one logit per token).
        num_layers: transformer blocks.
        num_heads: attention heads; must divide embed_dim.
        embed_dim: model width.
        mlp_dim: MLP hidden width (None: 4 * embed_dim).
        max_len: longest sequence the position embedding covers.
        positions: "learned" (an embedding per position, added to the tokens) or "rotary"
            (RoPE on q and k inside every attention).
        tie_embeddings: logits = x @ token_embedding.T instead of a separate output matrix.
        dropout: rate on the embeddings and both residual branches (train only).
        dtype: compute dtype (None: float32); parameters stay float32.
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        *,
        num_layers: int,
        num_heads: int,
        embed_dim: int,
        mlp_dim: int | None = None,
        max_len: int = 1024,
        positions: str = "learned",
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        if len(input_shape) != 1:
            raise ValueError(
                f"transformer needs token sequences (T,) per example; got {tuple(input_shape)}"
            )
        seq_len = int(input_shape[0])
        if seq_len > max_len:
            raise ValueError(
                f"the data's sequence length {seq_len} is longer than the transformer's max_len "
                f"{max_len}; raise model.max_len to at least {seq_len} or lower data.seq_len"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if positions not in ("learned", "rotary"):
            raise ValueError(f"unknown positions {positions!r}; use learned or rotary")
        if positions == "rotary" and (embed_dim // num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head size, got {embed_dim // num_heads}"
            )
        self.embed = nnx.Embed(
            num_outputs,
            embed_dim,
            dtype=dtype,
            embedding_init=_INIT,
            embedding_metadata=logical("vocab", "embed"),
            rngs=rngs,
        )
        self.pos_embed = (
            nnx.Embed(
                max_len,
                embed_dim,
                dtype=dtype,
                embedding_init=_INIT,
                embedding_metadata=logical(None, "embed"),
                rngs=rngs,
            )
            if positions == "learned"
            else None
        )
        # GPT-2: each residual branch's output projection is scaled so the residual stream's
        # variance does not grow with depth (two branches per block).
        out_init = nnx.initializers.normal(stddev=0.02 / math.sqrt(2 * num_layers))
        self.blocks = nnx.List(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_dim or 4 * embed_dim,
                    rotary=positions == "rotary",
                    dropout=dropout,
                    out_init=out_init,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.ln_f = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(
                embed_dim,
                num_outputs,
                use_bias=False,
                dtype=dtype,
                kernel_init=_INIT,
                kernel_metadata=logical("embed", "vocab"),
                rngs=rngs,
            )
        )
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Return next-token logits (batch, T, vocab) for token ids x (batch, T).

        Args:
            x: integer token ids (batch, T), T <= max_len.
            train: apply dropout (needs rngs when the rate is > 0).
            rngs: dropout keys.
        Returns:
            Logits in the compute dtype; position t depends only on tokens 0..t.
        """
        h = self.embed(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed(jnp.arange(x.shape[1]))[None]
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        for block in self.blocks:
            h = block(h, train=train, rngs=rngs)
        h = self.ln_f(h)
        return self.embed.attend(h) if self.head is None else self.head(h)
