"""GPT-2 in the Hugging Face layout: logit parity with an independent NumPy GPT-2, bit-exact round
trips (in memory and through a safetensors file), the accepted name variants and the errors."""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from accelctl import weights, weights_hf
from accelctl.errors import UserError
from accelctl.models.transformer import Transformer

VOCAB, E, HEADS, LAYERS, T, N_POS = 50, 32, 4, 2, 12, 16


# ----------------------------------------------------------------- reference GPT-2 in NumPy
# Written from the published GPT-2 architecture (Radford et al. 2019; the Conv1D layout of the
# Hugging Face checkpoints), not from accelctl's code. float64 throughout.
def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_new(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _conv1d(x: np.ndarray, hf: dict, name: str) -> np.ndarray:
    return x @ hf[name + ".weight"] + hf[name + ".bias"]  # Conv1D: weight is (in, out)


def numpy_gpt2_logits(hf: dict[str, np.ndarray], ids: np.ndarray, n_head: int) -> np.ndarray:
    """Logits (B, T, V) of GPT2LMHeadModel (tied head) for token ids (B, T)."""
    hf = {k: np.asarray(v, np.float64) for k, v in hf.items()}
    b, t = ids.shape
    x = hf["wte.weight"][ids] + hf["wpe.weight"][np.arange(t)][None]
    n_layer = 1 + max(int(k.split(".")[1]) for k in hf if k.startswith("h."))
    causal = np.tril(np.ones((t, t), bool))
    for i in range(n_layer):
        p = f"h.{i}."
        a = _layer_norm(x, hf[p + "ln_1.weight"], hf[p + "ln_1.bias"])
        q, k, v = np.split(_conv1d(a, hf, p + "attn.c_attn"), 3, axis=-1)

        def heads(z: np.ndarray) -> np.ndarray:
            return z.reshape(b, t, n_head, -1).transpose(0, 2, 1, 3)  # (B, H, T, D)

        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        scores = np.where(causal, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        att = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = x + _conv1d(att, hf, p + "attn.c_proj")
        m = _layer_norm(x, hf[p + "ln_2.weight"], hf[p + "ln_2.bias"])
        x = x + _conv1d(_gelu_new(_conv1d(m, hf, p + "mlp.c_fc")), hf, p + "mlp.c_proj")
    x = _layer_norm(x, hf["ln_f.weight"], hf["ln_f.bias"])
    return x @ hf["wte.weight"].T


def _random_hf(seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 weights in HF names and layout, large enough that attention is far from uniform."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hf = {"wte.weight": w(VOCAB, E, scale=0.5), "wpe.weight": w(N_POS, E, scale=0.5)}
    for i in range(LAYERS):
        p = f"h.{i}."
        hf |= {
            p + "ln_1.weight": 1 + w(E),
            p + "ln_1.bias": w(E),
            p + "attn.c_attn.weight": w(E, 3 * E),
            p + "attn.c_attn.bias": w(3 * E),
            p + "attn.c_proj.weight": w(E, E),
            p + "attn.c_proj.bias": w(E),
            p + "ln_2.weight": 1 + w(E),
            p + "ln_2.bias": w(E),
            p + "mlp.c_fc.weight": w(E, 4 * E),
            p + "mlp.c_fc.bias": w(4 * E),
            p + "mlp.c_proj.weight": w(4 * E, E),
            p + "mlp.c_proj.bias": w(E),
        }
    return hf | {"ln_f.weight": 1 + w(E), "ln_f.bias": w(E)}


def _model(**kw) -> Transformer:
    args = {"num_layers": LAYERS, "num_heads": HEADS, "embed_dim": E, "max_len": N_POS, **kw}
    return Transformer((T,), VOCAB, **args, rngs=nnx.Rngs(0))


def _import(flat: dict[str, np.ndarray]) -> Transformer:
    abstract = nnx.eval_shape(_model)
    state, report = weights.unflatten_into(nnx.state(abstract), flat)
    assert not report.kept and not report.ignored
    return nnx.merge(nnx.graphdef(abstract), state)


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, T)).astype(np.int32)


# ---------------------------------------------------------------------------------- parity
def test_reference_is_causal_and_sensitive_to_weights() -> None:
    """Guards the reference itself: a later token does not change earlier logits."""
    hf, ids = _random_hf(), _ids()
    ref = numpy_gpt2_logits(hf, ids, HEADS)
    changed = ids.copy()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    other = numpy_gpt2_logits(hf, changed, HEADS)
    np.testing.assert_array_equal(ref[:, :7], other[:, :7])
    assert np.abs(ref[:, 7:] - other[:, 7:]).max() > 1e-2
    assert ref.std() > 0.5  # logits well away from zero: the comparison below means something


def test_logits_match_the_numpy_gpt2() -> None:
    hf, ids = _random_hf(), _ids()
    model = _import(weights_hf.from_hf_gpt2(hf))
    got = np.asarray(model(jnp.asarray(ids), train=False))
    ref = numpy_gpt2_logits(hf, ids, HEADS)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_a_different_head_split_breaks_parity() -> None:
    """The q/k/v split and the head order matter: with 2 heads the same weights compute
    something else, so the parity above cannot hold by accident."""
    hf, ids = _random_hf(), _ids()
    model = _import(weights_hf.from_hf_gpt2(hf))
    got = np.asarray(model(jnp.asarray(ids), train=False))
    assert np.abs(got - numpy_gpt2_logits(hf, ids, 2)).max() > 1e-2


# ------------------------------------------------------------------------------- round trip
def test_export_import_round_trip_is_bit_exact(tmp_path: Path) -> None:
    flat = weights.flatten_state(nnx.state(_model(), nnx.Param))
    hf = weights_hf.to_hf_gpt2(flat, LAYERS)
    assert list(hf)[:3] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight"]
    assert hf["h.1.attn.c_attn.weight"].shape == (E, 3 * E) and "lm_head.weight" not in hf
    back = weights_hf.from_hf_gpt2(hf)
    assert set(back) == set(flat)
    for name, arr in flat.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    # ... and through a safetensors file that transformers accepts.
    path = tmp_path / "model.safetensors"
    weights.save(path, hf, metadata={}, header=weights_hf.SAFETENSORS_HEADER)
    loaded, meta = weights.load(path)
    assert meta == {"format": "pt", "arrays_sha256": weights.digest_flat(hf)}
    again = weights_hf.from_hf_gpt2(loaded)
    assert weights.digest_flat(again) == weights.digest_flat(flat)
    model = _import(again)
    ids = jnp.asarray(_ids(1))
    np.testing.assert_array_equal(model(ids, train=False), _model()(ids, train=False))


def test_lm_head_model_names_buffers_and_tied_head_are_accepted() -> None:
    hf = _random_hf()
    base = weights_hf.from_hf_gpt2(hf)
    lm = {"transformer." + k: v for k, v in hf.items()}
    causal = np.tril(np.ones((N_POS, N_POS), bool))[None, None]
    for i in range(LAYERS):
        lm[f"transformer.h.{i}.attn.bias"] = causal
        lm[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    lm["lm_head.weight"] = hf["wte.weight"].copy()
    got = weights_hf.from_hf_gpt2(lm)
    assert weights.digest_flat(got) == weights.digest_flat(base)
    exported = weights_hf.to_hf_gpt2(got, LAYERS, prefix="transformer.")
    assert set(exported) == {"transformer." + k for k in hf}


def test_untied_lm_head_is_refused() -> None:
    hf = _random_hf()
    hf["lm_head.weight"] = hf["wte.weight"] + 1
    with pytest.raises(UserError, match="untied output head"):
        weights_hf.from_hf_gpt2(hf)


def test_import_lists_every_missing_unknown_and_misshaped_array() -> None:
    hf = _random_hf()
    del hf["h.1.ln_2.bias"]
    hf["h.0.crossattention.c_attn.weight"] = np.zeros((E, 2 * E), np.float32)
    hf["h.0.attn.c_attn.weight"] = hf["h.0.attn.c_attn.weight"].T.copy()  # a Linear export
    with pytest.raises(UserError) as e:
        weights_hf.from_hf_gpt2(hf)
    msg = str(e.value)
    assert "3 problems" in msg and "h.1.ln_2.bias: missing" in msg
    assert "h.0.crossattention.c_attn.weight: not a GPT-2 weight" in msg
    assert "h.0.attn.c_attn.weight: shape (96, 32), expected (32, 96) (transposed?" in msg
    with pytest.raises(UserError, match="no wte.weight"):
        weights_hf.from_hf_gpt2({"encoder.weight": np.zeros(2)})


def test_rotary_and_untied_models_cannot_be_exported() -> None:
    rotary = weights.flatten_state(nnx.state(_model(positions="rotary"), nnx.Param))
    with pytest.raises(UserError, match="rotary positions"):
        weights_hf.to_hf_gpt2(rotary, LAYERS)
    untied = weights.flatten_state(nnx.state(_model(tie_embeddings=False), nnx.Param))
    with pytest.raises(UserError, match="untied"):
        weights_hf.to_hf_gpt2(untied, LAYERS)
    flat = weights.flatten_state(nnx.state(_model(), nnx.Param))
    with pytest.raises(UserError, match="blocks.1.ln1.scale: not part of a 1-layer GPT-2"):
        weights_hf.to_hf_gpt2(flat, 1)


def test_config_round_trip_and_unsupported_settings() -> None:
    cfg = weights_hf.hf_gpt2_config(
        vocab_size=VOCAB, max_len=N_POS, embed_dim=E, num_layers=LAYERS, num_heads=HEADS
    )
    dims = weights_hf.read_hf_gpt2_config(cfg)
    assert dims == {
        "vocab_size": VOCAB,
        "max_len": N_POS,
        "embed_dim": E,
        "num_layers": LAYERS,
        "num_heads": HEADS,
        "mlp_dim": None,
    }
    bad = cfg | {"activation_function": "gelu", "scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(UserError) as e:
        weights_hf.read_hf_gpt2_config(bad)
    assert "activation_function 'gelu'" in str(e.value)
    assert "scale_attn_by_inverse_layer_idx True" in str(e.value)
    assert weights_hf.read_hf_gpt2_config({"n_embd": 8, "n_inner": 20})["mlp_dim"] == 20
