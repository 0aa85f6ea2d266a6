"""Text generation with the transformer's key/value cache: prefill the prompt, then sample.

The prompt runs through `Transformer.decode` once, filling the cache; each further token is one
`decode` step of one token at the next position, so a step costs one token's work plus attention
over the cache instead of the whole sequence so far. Both are jitted with the graph definition
static (`nnx.split` once, then plain `jax.jit` over the state). The steps run either in one
`jax.lax.fori_loop` inside a single jitted call (`loop="fori"`, the default) or as a jitted
one-step function called from Python (`loop="python"`); both give the same tokens. On CPU the
fori loop is ~4-5x faster for gpt_tiny at batch 1 and ~2x at batch 8: a step computes in under
0.1 ms, less than dispatching a call from Python costs (docs/benchmarks/generate.md).

Sampling: greedy (argmax) at temperature 0; otherwise softmax(logits / temperature), limited to
the `top_k` most likely tokens when given. Step s draws with `fold_in(key(seed), s)`, so a seed
gives the same tokens on any device count.

Text: `encode_text` / `decode_text` map text to byte tokens (UTF-8, vocabulary 256), the
tokenisation of the `tokens` data source's `kind: text`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from accelctl.errors import UserError

LOOPS = ("fori", "python")


@dataclass(frozen=True)
class GenerateStats:
    """Timings of one `generate` call (seconds; compile apart from the run).

    Attributes:
        batch: sequences generated together.
        prompt_tokens: tokens of each prompt.
        new_tokens: tokens generated for each sequence.
        compile_s: tracing and compiling the prefill and the decoding steps.
        prefill_s: the prompt's forward pass and the first sampled token.
        decode_s: the remaining new_tokens - 1 steps.
    """

    batch: int
    prompt_tokens: int
    new_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of prefill + decoding, compile excluded."""
        return self.batch * self.new_tokens / max(self.prefill_s + self.decode_s, 1e-12)


def _sample(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, *, greedy: bool, top_k: int | None
) -> jax.Array:
    """Next tokens (batch,) int32 from last-position logits (batch, vocab)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_k is None:
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    # Sample among exactly k candidates (ties at the k-th value do not widen the choice).
    values, index = jax.lax.top_k(scaled, top_k)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


_STATIC = ("graphdef", "greedy", "top_k")


@partial(jax.jit, static_argnames=(*_STATIC, "length"))
def _prefill(
    state: nnx.State,
    prompt: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    length: int,
    greedy: bool,
    top_k: int | None,
) -> tuple[jax.Array, Any]:
    """(first new token (batch,), cache) for prompt (batch, T) and a cache of `length` steps."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0], length)
    logits, cache = model.decode(prompt, cache, 0)
    token = _sample(
        logits[:, -1], jax.random.fold_in(key, 0), temperature, greedy=greedy, top_k=top_k
    )
    return token, cache


# The cache is not donated: nothing returned could reuse its buffers.
@partial(jax.jit, static_argnames=(*_STATIC, "steps"))
def _decode_loop(
    state: nnx.State,
    token: jax.Array,
    cache: Any,
    start: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    steps: int,
    greedy: bool,
    top_k: int | None,
) -> jax.Array:
    """The `steps` tokens (batch, steps) that follow `token` (batch,), which is fed at `start`."""
    model = nnx.merge(graphdef, state)
    out = jnp.zeros((token.shape[0], steps), jnp.int32)

    def body(i: jax.Array, carry: tuple[jax.Array, Any, jax.Array]) -> tuple[jax.Array, Any, Any]:
        token, cache, out = carry
        logits, cache = model.decode(token[:, None], cache, start + i)
        key_i = jax.random.fold_in(key, i + 1)
        token = _sample(logits[:, -1], key_i, temperature, greedy=greedy, top_k=top_k)
        return token, cache, jax.lax.dynamic_update_slice(out, token[:, None], (0, i))

    _, _, out = jax.lax.fori_loop(0, steps, body, (token, cache, out))
    return out


@partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode_step(
    state: nnx.State,
    token: jax.Array,
    cache: Any,
    start: jax.Array,
    step: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    greedy: bool,
    top_k: int | None,
) -> tuple[jax.Array, Any]:
    """(new token `step` (batch,), cache) after feeding token step - 1 (batch,); the prompt's T
    tokens end at `start` - 1 and the prefill sampled step 0."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(token[:, None], cache, start + step - 1)
    key_s = jax.random.fold_in(key, step)
    return _sample(logits[:, -1], key_s, temperature, greedy=greedy, top_k=top_k), cache


def _module_and_parts(model: Any) -> tuple[nnx.Module, nnx.GraphDef, nnx.State]:
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return model, graphdef, state
    graphdef, state = model
    return nnx.merge(graphdef, state), graphdef, state


def _check(
    module: nnx.Module,
    prompt: np.ndarray,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> None:
    if not (hasattr(module, "decode") and hasattr(module, "init_cache")):
        raise UserError(
            f"{type(module).__name__} has no key/value-cache decoding; generation needs "
            "accelctl's transformer model"
        )
    vocab, max_len = module.embed.num_embeddings, module.max_len
    if prompt.ndim != 2 or prompt.shape[1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise UserError(
            f"the prompt must be a non-empty sequence of token ids; got shape {prompt.shape[1:]} "
            f"of {prompt.dtype}",
            param="prompt",
        )
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise UserError(
            f"prompt token ids must lie in 0..{vocab - 1} (the model's vocabulary); got "
            f"{int(prompt.min())}..{int(prompt.max())}",
            param="prompt",
        )
    if max_new_tokens < 1:
        raise UserError("generate at least one token", param="max_new_tokens", value=max_new_tokens)
    if prompt.shape[1] + max_new_tokens > max_len:
        raise UserError(
            f"the prompt's {prompt.shape[1]} tokens + {max_new_tokens} new ones exceed the "
            f"model's max_len {max_len}; generate at most {max_len - prompt.shape[1]} tokens "
            "or shorten the prompt",
            param="max_new_tokens",
            value=max_new_tokens,
        )
    if not temperature >= 0:
        raise UserError(
            "use 0 (greedy) or a positive value", param="temperature", value=temperature
        )
    if top_k is not None and not 1 <= top_k <= vocab:
        raise UserError(f"use 1..{vocab} (the vocabulary) or none", param="top_k", value=top_k)


def generate(
    model: nnx.Module | tuple[nnx.GraphDef, nnx.State],
    prompt_ids: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    loop: str = "fori",
) -> tuple[np.ndarray, GenerateStats]:
    """Continue token sequences with a transformer, using its key/value cache.

    Args:
        model: a `Transformer`, or its (graphdef, state) from `nnx.split`; the state may be
            placed on any devices (e.g. replicated over a mesh).
        prompt_ids: integer token ids (T,) or (batch, T); every row continues from its T tokens.
        max_new_tokens: tokens to generate; T + max_new_tokens <= the model's max_len.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_k: sample among the k most likely tokens only (None: all); top_k=1 is greedy.
        seed: sampling seed; the same seed gives the same tokens.
        loop: "fori" (all steps in one jitted call) or "python" (a jitted step per token).
    Returns:
        (ids, stats): ids int32 of the prompt's rank, (T + max_new_tokens,) or
        (batch, T + max_new_tokens), the prompt followed by the new tokens; stats timings.
    Raises:
        UserError: a model without a cache path, a prompt that is empty, out of the vocabulary or
            too long for max_len with the new tokens, a negative temperature, a bad top_k.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    module, graphdef, state = _module_and_parts(model)
    prompt = np.asarray(prompt_ids)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    _check(module, prompt, max_new_tokens, temperature, top_k)
    prompt = prompt.astype(np.int32)
    batch, t = prompt.shape
    greedy = temperature == 0
    static = {"graphdef": graphdef, "greedy": greedy, "top_k": top_k}
    key = jax.random.key(seed)
    temp = jnp.float32(temperature if not greedy else 1.0)

    t0 = time.perf_counter()
    length = t + max_new_tokens
    prefill = _prefill.lower(state, prompt, key, temp, length=length, **static).compile()
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    token, cache = prefill(state, prompt, key, temp)
    token.block_until_ready()
    prefill_s = time.perf_counter() - t0

    # Compiled for the arrays the prefill returned, so their placement (e.g. replicated over a
    # mesh like the state) is what the decoding steps expect.
    t0 = time.perf_counter()
    pos = jnp.int32(t)
    if max_new_tokens == 1:
        decode = None
    elif loop == "fori":
        decode = _decode_loop.lower(
            state, token, cache, pos, key, temp, steps=max_new_tokens - 1, **static
        ).compile()
    else:
        one = jnp.int32(1)
        decode = _decode_step.lower(state, token, cache, pos, one, key, temp, **static).compile()
    compile_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    if decode is None:  # the prefill sampled the only new token
        new = [np.asarray(token)[:, None]]
    elif loop == "fori":
        rest = decode(state, token, cache, pos, key, temp).block_until_ready()
        new = [np.asarray(token)[:, None], np.asarray(rest)]
    else:
        tokens = [token]
        for s in range(1, max_new_tokens):
            token, cache = decode(state, token, cache, pos, jnp.int32(s), key, temp)
            tokens.append(token)
        tokens[-1].block_until_ready()
        new = [np.stack([np.asarray(x) for x in tokens], axis=1)]
    decode_s = time.perf_counter() - t0

    ids = np.concatenate([prompt, *new], axis=1)
    stats = GenerateStats(batch, t, max_new_tokens, compile_s, prefill_s, decode_s)
    return (ids[0] if squeeze else ids), stats


def encode_text(text: str, vocab_size: int = 256) -> np.ndarray:
    """Byte tokens of `text`: its UTF-8 bytes as int32 ids (T,).

    Raises:
        UserError: a byte is not a token of a `vocab_size` vocabulary (e.g. a non-ASCII
            character for a model over fewer than 256 tokens).
    """
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if ids.size and ids.max() >= vocab_size:
        bad = sorted({int(b) for b in ids if b >= vocab_size})
        raise UserError(
            f"the text has bytes {bad[:8]} outside the model's vocabulary of {vocab_size} byte "
            "tokens (UTF-8 encodes non-ASCII characters as bytes >= 128); use text the model "
            "was trained on",
            param="prompt",
        )
    return ids


def decode_text(ids: Any) -> str:
    """Text of byte tokens: UTF-8 decoded, invalid sequences (and ids >= 256) as U+FFFD."""
    flat = np.asarray(ids).reshape(-1)
    chunks = []
    for i in flat.tolist():
        chunks.append(bytes([i]) if 0 <= i < 256 else "\ufffd".encode())
    return b"".join(chunks).decode("utf-8", errors="replace")
