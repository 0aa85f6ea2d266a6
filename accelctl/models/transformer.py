"""Decoder-only transformer (GPT-2 layout): token + position embeddings, pre-norm blocks of
causal self-attention and a gelu MLP, a final LayerNorm and logits over the vocabulary.

Inference can also run incrementally: `init_cache` + `decode` process the prompt once and then
one token per step against a key/value cache (`accelctl.generate`), with the same parameters.

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

from accelctl.models.layers import checkpointed, logical

_INIT = nnx.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon
# model.attention -> jax.nn.dot_product_attention(implementation=...); auto = JAX's choice.
ATTENTION_IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}
REMAT_MODES = ("none", "full", "dots", "offload")
# Per block (keys, values), each (batch, length, heads, head_dim): what `Transformer.decode` reads.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


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


def apply_rotary(x: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
    """Rotate query or key vectors by their position (RoPE, Su et al. 2021; half-split form).

    Args:
        x: (batch, T, heads, head_dim) with an even head_dim.
        offset: absolute position of x's first step (an int or an int32 scalar, may be traced);
            a decoding step rotates its one token by where it stands in the whole sequence.
    Returns:
        Same shape and dtype; pairs (i, i + head_dim/2) rotated by angle pos * 10000^(-2i/d),
        pos = offset + t.
    """
    _, t, _, d = x.shape
    half = d // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    pos = (jnp.arange(t, dtype=jnp.int32) + offset).astype(jnp.float32)
    angle = pos[:, None] * freq[None, :]  # (T, d/2)
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
        attention: kernel of the training/evaluation pass, a key of ATTENTION_IMPLEMENTATIONS
            (decoding with a cache always uses JAX's default: cuDNN's kernel takes no masks).
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
        attention: str = "auto",
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
        self.implementation = ATTENTION_IMPLEMENTATIONS[attention]

    def _qkv(self, x: jax.Array, offset: int | jax.Array) -> tuple[jax.Array, ...]:
        """q, k, v (batch, T, heads, head_dim) of x (batch, T, embed_dim) starting at `offset`."""
        b, t, _ = x.shape

        def heads(proj: nnx.Linear) -> jax.Array:
            return proj(x).reshape(b, t, self.num_heads, self.head_dim)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        if self.rotary:
            q, k = apply_rotary(q, offset), apply_rotary(k, offset)
        return q, k, v

    def __call__(self, x: jax.Array) -> jax.Array:
        """Return (batch, T, embed_dim) for x (batch, T, embed_dim); position t sees 0..t."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, 0)
        y = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=self.implementation
        )
        return self.out(y.reshape(b, t, self.num_heads * self.head_dim))

    def decode(
        self, x: jax.Array, cache: tuple[jax.Array, jax.Array], position: int | jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attend a chunk of steps at `position` to itself and to the cached steps before it.

        Args:
            x: (batch, T, embed_dim), the steps at positions position .. position + T - 1.
            cache: (keys, values), each (batch, L, heads, head_dim); steps < position filled.
            position: int32 scalar (may be traced); position + T <= L.
        Returns:
            ((batch, T, embed_dim), cache with this chunk's keys and values written in).
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x, position)
        zero = jnp.zeros((), jnp.int32)
        at = (zero, jnp.asarray(position, jnp.int32), zero, zero)
        keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
        values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        # Step position + i sees the cached steps 0 .. position + i; the rest of the buffer
        # (zeros, or stale steps of nothing) is masked out.
        length = keys.shape[1]
        visible = jnp.arange(length)[None, :] <= (position + jnp.arange(t))[:, None]  # (T, L)
        y = jax.nn.dot_product_attention(
            q, keys.astype(q.dtype), values.astype(q.dtype), mask=visible[None, None]
        )
        return self.out(y.reshape(b, t, self.num_heads * self.head_dim)), (keys, values)


class Block(nnx.Module):
    """Pre-norm block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x))).

    Args:
        embed_dim, num_heads, rotary: as in `Attention`.
        mlp_dim: hidden width of the MLP.
        dropout: dropout rate on both residual branches (train only).
        out_init: initialiser of the two residual output projections.
        attention: as in `Attention`.
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
        attention: str = "auto",
        dtype: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.ln1 = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(
            embed_dim,
            num_heads,
            rotary=rotary,
            out_init=out_init,
            attention=attention,
            dtype=dtype,
            rngs=rngs,
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
        return x + self.dropout(self._mlp(x), **drop)

    def _mlp(self, x: jax.Array) -> jax.Array:
        # jax.nn.gelu's default approximate=True is the tanh form: GPT-2's "gelu_new".
        return self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))

    def decode(
        self, x: jax.Array, cache: tuple[jax.Array, jax.Array], position: int | jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block on a chunk at `position` with its layer's key/value cache (no dropout).

        Returns:
            ((batch, T, embed_dim), the updated cache); see `Attention.decode`.
        """
        y, cache = self.attn.decode(self.ln1(x), cache, position)
        x = x + y
        return x + self._mlp(x), cache


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
        remat: activation checkpointing per block (none, full, dots, offload; see
            `layers.remat_policy`): the backward pass recomputes a block's activations from its
            input instead of keeping them.
        attention: attention kernel, a key of ATTENTION_IMPLEMENTATIONS.
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
        remat: str = "none",
        attention: str = "auto",
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
        if remat not in REMAT_MODES:
            raise ValueError(f"unknown remat {remat!r}; use {', '.join(REMAT_MODES)}")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention {attention!r}; use auto, xla or cudnn")
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
                    attention=attention,
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
        # Static attributes (no weights, nothing in a checkpoint) that `init_cache` reads.
        self.max_len = max_len
        self.num_heads = num_heads
        self.compute_dtype = dtype
        self.remat = remat

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

        def run_block(block: Block, h: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
            return block(h, train=train, rngs=rngs)

        # One checkpoint per block (MaxText's layer-wise remat): what each block keeps for the
        # backward pass is its input (and, under dots/offload, its linear layers' outputs).
        block_fn = checkpointed(run_block, self.remat)
        for block in self.blocks:
            h = block_fn(block, h, rngs)
        h = self.ln_f(h)
        return self.embed.attend(h) if self.head is None else self.head(h)

    def init_cache(self, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
        """Empty key/value buffers for `decode`.

        Args:
            batch: sequences decoded together.
            length: positions the buffers hold (None: max_len); prompt + new tokens must fit.
            dtype: buffer dtype (None: the compute dtype, float32 by default).
        Returns:
            One (keys, values) pair per block, each zeros (batch, length, heads, head_dim).
        """
        length = self.max_len if length is None else length
        if length > self.max_len:
            raise ValueError(f"cache length {length} is longer than max_len {self.max_len}")
        head_dim = self.embed.features // self.num_heads
        shape = (batch, length, self.num_heads, head_dim)
        dtype = dtype or self.compute_dtype or jnp.float32
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)

    def decode(
        self, x: jax.Array, cache: KVCache, position: int | jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """Next-token logits for a chunk of tokens that continues the cached ones (inference).

        The prompt goes in as one chunk at position 0, then each sampled token as a chunk of one
        at the next position: every step costs one token's work plus attention over the cache,
        instead of `__call__` over the whole sequence so far. Same parameters and, up to float
        rounding, the same logits as `__call__` on the whole sequence.

        Args:
            x: integer token ids (batch, T) at positions position .. position + T - 1.
            cache: from `init_cache` or the previous `decode`; steps < position filled.
            position: int32 scalar (may be traced); position + T <= the cache length.
        Returns:
            (logits (batch, T, vocab) in the compute dtype, the cache with these T steps added).
        """
        h = self.embed(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed(position + jnp.arange(x.shape[1]))[None]
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            h, layer_cache = block.decode(h, layer_cache, position)
            new_cache.append(layer_cache)
        h = self.ln_f(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits, tuple(new_cache)


def training_flops(
    *, batch: int, seq_len: int, num_layers: int, embed_dim: int, mlp_dim: int, vocab_size: int
) -> int:
    """Model FLOPs of one training step (forward + backward) of `Transformer`, counted as PaLM
    (Chowdhery et al. 2022, appendix B) and MaxText count them for MFU.

    Only matmuls count (a (m, k) @ (k, n) product is 2mkn FLOPs); biases, norms, softmax, the
    loss and the optimizer are left out, and so is recomputation under remat (that is hardware
    FLOPs, not model FLOPs). The backward pass costs twice the forward one (gradients for the
    inputs and for the weights), so a training step is 3x the forward pass:

        6 * B * T * N + 6 * L * B * T^2 * d,    N = L * (4 d^2 + 2 d m) + d V

    N counts the weights every token is multiplied by: in each of the L blocks the q, k, v and
    output projections (4 d^2) and the MLP (2 d m), plus the logits matmul (d V) -- the tied
    token embedding or the separate head, once either way. Embedding and position lookups are
    gathers (no FLOPs), so N is the non-embedding weight count plus the logits matmul; bias and
    LayerNorm parameters are not in N. The attention term: per sequence and block the scores
    q k^T and the weighted sum of the values are 2 T^2 d FLOPs each in the forward pass; causal
    attention needs only the half at or below the diagonal (MaxText halves it; PaLM's
    12 * L * T * d per token does not), and training is 3x: 3 * (4 T^2 d) / 2 = 6 T^2 d.

    Args:
        batch: B, sequences per step (global).
        seq_len: T, tokens per sequence.
        num_layers: L.
        embed_dim: d.
        mlp_dim: m, the MLP's hidden width.
        vocab_size: V.
    Returns:
        FLOPs of one step over the whole global batch.
    """
    b, t, layers, d, m, v = batch, seq_len, num_layers, embed_dim, mlp_dim, vocab_size
    weights = layers * (4 * d * d + 2 * d * m) + d * v
    return 6 * b * t * weights + 6 * layers * b * t * t * d
