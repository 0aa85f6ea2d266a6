"""Generation with the key/value cache: the cached decode path against the full forward pass
(learned and rotary positions, 1 and 8 devices), sampling determinism, top-k, the limits, and
the byte-level text helpers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.errors import UserError
from accelctl.generate import decode_text, encode_text, generate
from accelctl.models.transformer import Transformer

VOCAB, MAX_LEN, PROMPT, NEW = 23, 20, 5, 6


@functools.cache  # built once per test session: no test changes the model
def _model(positions: str = "learned") -> Transformer:
    model = Transformer(
        (MAX_LEN,),
        VOCAB,
        num_layers=2,
        num_heads=2,
        embed_dim=16,
        max_len=MAX_LEN,
        positions=positions,
        rngs=nnx.Rngs(0),
    )
    # Sharper than the initialisation (stddev 0.02), so that greedy continuations wander over
    # many tokens instead of repeating one: a wrong position or mask then changes the tokens.
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a * 8, state))


def _prompt(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, PROMPT)).astype(np.int32)


def _forward(model: Transformer, ids: jax.Array) -> jax.Array:
    """`model(ids, train=False)`, jitted (one compile per length instead of one per op)."""
    graphdef, state = nnx.split(model)
    return _jit_forward(graphdef, state, ids)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids, train=False)


def _greedy_without_cache(model: Transformer, prompt: np.ndarray, n: int) -> np.ndarray:
    """The full forward pass re-run on the whole sequence so far, for every new token."""
    ids = jnp.asarray(prompt)
    for _ in range(n):
        nxt = jnp.argmax(_forward(model, ids)[:, -1], axis=-1).astype(jnp.int32)
        ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
    return np.asarray(ids)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_greedy_with_cache_equals_the_full_forward_on_1_and_8_devices(positions: str) -> None:
    model, prompt = _model(positions), _prompt()
    want = _greedy_without_cache(model, prompt, NEW)
    assert len(np.unique(want[:, PROMPT:])) > 3  # the continuation is not one repeated token

    ids, stats = generate(model, prompt, max_new_tokens=NEW)
    np.testing.assert_array_equal(ids, want)
    assert (stats.batch, stats.prompt_tokens, stats.new_tokens) == (2, PROMPT, NEW)
    assert stats.compile_s > 0 and stats.tokens_per_s > 0

    # A mesh as parallel.make_mesh builds it (automatic sharding axes).
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    graphdef, state = nnx.split(model)
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    leaf = jax.tree.leaves(replicated)[0]
    assert len(leaf.sharding.device_set) == 8
    ids, _ = generate((graphdef, replicated), prompt, max_new_tokens=NEW)
    np.testing.assert_array_equal(ids, want)


def test_a_single_prompt_and_a_single_new_token() -> None:
    model, prompt = _model(), _prompt()
    ids, _ = generate(model, prompt[0], max_new_tokens=1)
    assert ids.shape == (PROMPT + 1,)
    np.testing.assert_array_equal(ids, _greedy_without_cache(model, prompt[:1], 1)[0])


def test_sampling_is_deterministic_per_seed_and_loop_independent() -> None:
    model, prompt = _model(), _prompt(1)

    def sample(seed: int, loop: str = "fori", **kw) -> np.ndarray:
        kw = {"temperature": 1.0, **kw}
        return generate(model, prompt, max_new_tokens=NEW, seed=seed, loop=loop, **kw)[0]

    first = sample(1)
    np.testing.assert_array_equal(sample(1), first)
    np.testing.assert_array_equal(sample(1, loop="python"), first)
    assert not np.array_equal(sample(2), first)
    # The same draws with the parameters replicated over 8 devices.
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    on_8, _ = generate((graphdef, replicated), prompt, max_new_tokens=NEW, temperature=1.0, seed=1)
    np.testing.assert_array_equal(on_8, first)
    np.testing.assert_array_equal(first[:, :PROMPT], prompt)
    # Sampling is not greedy here, and top_k=1 is.
    greedy = generate(model, prompt, max_new_tokens=NEW)[0]
    assert not np.array_equal(first, greedy)
    np.testing.assert_array_equal(sample(3, top_k=1), greedy)


def test_top_k_samples_only_among_the_k_most_likely() -> None:
    model, prompt = _model(), _prompt(2)
    ids, _ = generate(model, prompt, max_new_tokens=NEW, temperature=5.0, top_k=3, seed=0)
    # One causal forward pass over the result gives every step's logits (position p predicts
    # token p + 1 from tokens 0..p, all of which were fixed when p + 1 was sampled).
    logits = np.asarray(_forward(model, jnp.asarray(ids)))
    for p in range(PROMPT - 1, PROMPT + NEW - 1):
        top3 = np.argsort(logits[:, p], axis=-1)[:, -3:]
        assert all(ids[b, p + 1] in top3[b] for b in range(2)), p
    # A high temperature spreads the choice: not every sampled token is the argmax.
    chosen = ids[:, PROMPT:]
    argmax = logits[:, PROMPT - 1 : -1].argmax(-1)
    assert (chosen != argmax).any()


def test_limits_are_user_errors() -> None:
    model, prompt = _model(), _prompt()
    with pytest.raises(UserError, match="5 tokens \\+ 16 new ones exceed the model's max_len 20"):
        generate(model, prompt, max_new_tokens=16)
    with pytest.raises(UserError, match="token ids must lie in 0..22"):
        generate(model, prompt + VOCAB, max_new_tokens=2)
    with pytest.raises(UserError, match="non-empty"):
        generate(model, np.zeros((1, 0), np.int32), max_new_tokens=2)
    with pytest.raises(UserError, match="top_k"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_k=VOCAB + 1)
    with pytest.raises(UserError, match="temperature"):
        generate(model, prompt, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(UserError, match="no key/value-cache decoding"):
        generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), prompt, max_new_tokens=2)


def test_decode_chunks_match_the_forward_pass() -> None:
    """Transformer.decode directly: a prompt chunk, then single tokens, then a chunk of two."""
    for positions in ("learned", "rotary"):
        model = _model(positions)
        graphdef, state = nnx.split(model)
        decode = jax.jit(lambda s, x, c, p: nnx.merge(graphdef, s).decode(x, c, p))  # noqa: B023
        x = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 9)), jnp.int32)
        full = _forward(model, x)
        cache = model.init_cache(2, 12)
        parts, pos = [], 0
        for size in (4, 1, 1, 1, 2):
            logits, cache = decode(state, x[:, pos : pos + size], cache, jnp.int32(pos))
            parts.append(logits)
            pos += size
        got = jnp.concatenate(parts, axis=1)
        # Logits of up to ~10 (sharpened weights); summation order differs with the chunking.
        np.testing.assert_allclose(got, full, rtol=1e-4, atol=5e-4, err_msg=positions)
    with pytest.raises(ValueError, match="cache length 21 is longer than max_len 20"):
        model.init_cache(1, MAX_LEN + 1)


def test_text_helpers() -> None:
    ids = encode_text("héllo")
    assert ids.dtype == np.int32 and ids.tolist() == [104, 195, 169, 108, 108, 111]
    assert decode_text(ids) == "héllo"
    assert decode_text([104, 195, 300]) == "h\ufffd\ufffd"  # a cut-off character, an id > 255
    with pytest.raises(UserError, match=r"bytes \[169, 195\] outside .* 128 byte tokens"):
        encode_text("héllo", vocab_size=128)
    assert encode_text("").shape == (0,)
