"""GPT-2 weights in the Hugging Face layout (`format: hf_gpt2`), to and from accelctl's names.

accelctl's `Transformer` with learned positions and tied embeddings is GPT-2's architecture:
token + position embeddings, pre-norm blocks (LayerNorm eps 1e-5, causal self-attention scaled
by 1/sqrt(head_dim), a 4x MLP with the tanh approximation of gelu), a final LayerNorm and logits
from the token table. The MLP activation is `jax.nn.gelu`, whose default `approximate=True` is
the tanh form that transformers calls "gelu_new" (also "gelu_pytorch_tanh"), GPT-2's own.

Layout (names of `GPT2Model`; `GPT2LMHeadModel.save_pretrained` writes them under
`transformer.`, and `lm_head.weight` only when it is not tied to `wte.weight`):

    wte.weight (V, E)                      embed.embedding
    wpe.weight (max_len, E)                pos_embed.embedding
    h.{i}.ln_1.{weight,bias} (E,)          blocks.{i}.ln1.{scale,bias}
    h.{i}.attn.c_attn.weight (E, 3E)       blocks.{i}.attn.{query,key,value}.kernel, concatenated
    h.{i}.attn.c_attn.bias (3E,)           blocks.{i}.attn.{query,key,value}.bias, concatenated
    h.{i}.attn.c_proj.{weight,bias}        blocks.{i}.attn.out.{kernel,bias}
    h.{i}.ln_2.{weight,bias}               blocks.{i}.ln2.{scale,bias}
    h.{i}.mlp.c_fc.{weight,bias} (E, M)    blocks.{i}.mlp_in.{kernel,bias}
    h.{i}.mlp.c_proj.{weight,bias} (M, E)  blocks.{i}.mlp_out.{kernel,bias}
    ln_f.{weight,bias}                     ln_f.{scale,bias}

HF's `Conv1D` stores its weight as (in, out), as `nnx.Linear` stores its kernel, so no weight is
transposed; q, k and v lie side by side on the output axis, each split into heads in order, as
accelctl's reshape (E) -> (heads, head_dim) splits them. The attention buffers `h.{i}.attn.bias`
(the causal mask) and `h.{i}.attn.masked_bias` of older checkpoints are not weights: ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from accelctl.errors import UserError

# Hugging Face transformers refuses a safetensors file without this header entry.
SAFETENSORS_HEADER = {"format": "pt"}
_PREFIX = "transformer."
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"h\.(\d+)\.")
# transformers' names of the tanh approximation of gelu (GPT-2's activation).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")

# (HF name within h.{i}, accelctl name within blocks.{i}) of the arrays mapped one to one.
_BLOCK = (
    ("ln_1.weight", "ln1.scale"),
    ("ln_1.bias", "ln1.bias"),
    ("attn.c_proj.weight", "attn.out.kernel"),
    ("attn.c_proj.bias", "attn.out.bias"),
    ("ln_2.weight", "ln2.scale"),
    ("ln_2.bias", "ln2.bias"),
    ("mlp.c_fc.weight", "mlp_in.kernel"),
    ("mlp.c_fc.bias", "mlp_in.bias"),
    ("mlp.c_proj.weight", "mlp_out.kernel"),
    ("mlp.c_proj.bias", "mlp_out.bias"),
)
_QKV = ("query", "key", "value")
_TOP = (
    ("wte.weight", "embed.embedding"),
    ("wpe.weight", "pos_embed.embedding"),
    ("ln_f.weight", "ln_f.scale"),
    ("ln_f.bias", "ln_f.bias"),
)


def _hf_names(num_layers: int) -> list[str]:
    names = ["wte.weight", "wpe.weight"]
    for i in range(num_layers):
        block = [hf for hf, _ in _BLOCK] + ["attn.c_attn.weight", "attn.c_attn.bias"]
        names += [f"h.{i}.{n}" for n in block]
    return [*names, "ln_f.weight", "ln_f.bias"]


def _accelctl_names(num_layers: int) -> list[str]:
    names = [ours for _, ours in _TOP]
    for i in range(num_layers):
        names += [f"blocks.{i}.{ours}" for _, ours in _BLOCK]
        names += [f"blocks.{i}.attn.{p}.{w}" for p in _QKV for w in ("kernel", "bias")]
    return names


def _fail(what: str, problems: list[str], fix: str) -> UserError:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    return UserError(f"{what}:\n  " + "\n  ".join(shown) + f"\n{fix}")


def to_hf_gpt2(
    flat: Mapping[str, Any], num_layers: int, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """accelctl Transformer weights in GPT-2's Hugging Face names and layout.

    Args:
        flat: `weights.flatten_state` of a Transformer's parameters (learned positions, tied
            embeddings).
        num_layers: the model's number of blocks.
        prefix: put before every name; "transformer." gives GPT2LMHeadModel's state-dict names.
    Returns:
        {HF name: array} in GPT-2's order; the arrays keep their dtype. No `lm_head.weight`:
        GPT-2 ties it to `wte.weight`.
    Raises:
        UserError: the weights are not GPT-2's architecture (rotary positions, an untied output
            head) or do not match `num_layers` (every missing and unexpected name listed).
    """
    if "pos_embed.embedding" not in flat and "embed.embedding" in flat:
        raise UserError(
            "hf_gpt2 cannot hold this model: it uses rotary positions, and GPT-2 has a learned "
            "position table (wpe). Export it as safetensors or npz in accelctl's own layout."
        )
    if "head.kernel" in flat:
        raise UserError(
            "hf_gpt2 cannot hold this model: its output head is untied (tie_embeddings: false), "
            "and GPT-2's logits come from the token table (wte). Export it as safetensors or npz "
            "in accelctl's own layout."
        )
    want = _accelctl_names(num_layers)
    problems = [f"{n}: missing" for n in want if n not in flat]
    problems += [f"{n}: not part of a {num_layers}-layer GPT-2" for n in flat if n not in set(want)]
    if problems:
        raise _fail(
            f"these weights are not a {num_layers}-layer accelctl Transformer",
            problems,
            "Export the parameters of a transformer model with its num_layers.",
        )
    arr = {n: np.asarray(a) for n, a in flat.items()}
    out = {"wte.weight": arr["embed.embedding"], "wpe.weight": arr["pos_embed.embedding"]}
    for i in range(num_layers):
        ours = f"blocks.{i}."
        for hf, name in _BLOCK:
            out[f"h.{i}.{hf}"] = arr[ours + name]
        out[f"h.{i}.attn.c_attn.weight"] = np.concatenate(
            [arr[f"{ours}attn.{p}.kernel"] for p in _QKV], axis=1
        )
        out[f"h.{i}.attn.c_attn.bias"] = np.concatenate([arr[f"{ours}attn.{p}.bias"] for p in _QKV])
    out["ln_f.weight"], out["ln_f.bias"] = arr["ln_f.scale"], arr["ln_f.bias"]
    order = _hf_names(num_layers)
    return {prefix + n: out[n] for n in order}


def from_hf_gpt2(hf: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """GPT-2 weights in the Hugging Face layout as accelctl Transformer weights.

    Accepts `GPT2Model` names and `GPT2LMHeadModel` ones (under `transformer.`), with or without
    `lm_head.weight` (it must equal `wte.weight`: accelctl ties them) and the attention buffers.

    Args:
        hf: {HF name: array} (e.g. `weights.load` of a model.safetensors).
    Returns:
        {accelctl name: array} of a Transformer with learned positions and tied embeddings, the
        number of layers found in the names; the arrays keep their dtype (cast when loading).
    Raises:
        UserError: listing every missing, unexpected or wrongly-shaped array, or an untied head.
    """
    named = {
        (n[len(_PREFIX) :] if n.startswith(_PREFIX) else n): np.asarray(a) for n, a in hf.items()
    }
    named = {n: a for n, a in named.items() if not _BUFFER.fullmatch(n)}
    if "wte.weight" not in named:
        raise UserError(
            "not GPT-2 weights in the Hugging Face layout: there is no wte.weight (or "
            f"transformer.wte.weight); the names start {sorted(hf)[:5]}"
        )
    wte = named["wte.weight"]
    head = named.pop("lm_head.weight", None)
    if head is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
        raise UserError(
            "lm_head.weight differs from wte.weight: this GPT-2 has an untied output head, and "
            "accelctl's hf_gpt2 weights are tied (logits from the token table)."
        )
    layers = sorted({int(m.group(1)) for n in named if (m := _LAYER.match(n))})
    num_layers = layers[-1] + 1 if layers else 0
    want = _hf_names(num_layers)
    problems = [f"{n}: missing" for n in want if n not in named]
    problems += [f"{n}: not a GPT-2 weight accelctl knows" for n in named if n not in set(want)]
    if wte.ndim == 2:
        problems += _shape_problems(named, num_layers, embed=wte.shape[1])
    else:
        problems.append(f"wte.weight: shape {wte.shape}, expected (vocab, embed)")
    if problems:
        raise _fail(
            f"these GPT-2 weights do not fit accelctl's Transformer ({len(problems)} problems)",
            problems,
            "Use a GPT2LMHeadModel / GPT2Model checkpoint without cross-attention.",
        )
    out = {"embed.embedding": wte, "pos_embed.embedding": named["wpe.weight"]}
    for i in range(num_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for hf_name, name in _BLOCK:
            out[dst + name] = named[src + hf_name]
        kernels = np.split(named[src + "attn.c_attn.weight"], 3, axis=1)
        biases = np.split(named[src + "attn.c_attn.bias"], 3)
        for p, k, b in zip(_QKV, kernels, biases, strict=True):
            out[f"{dst}attn.{p}.kernel"], out[f"{dst}attn.{p}.bias"] = k, b
    out["ln_f.scale"], out["ln_f.bias"] = named["ln_f.weight"], named["ln_f.bias"]
    return out


def _shape_problems(named: Mapping[str, np.ndarray], num_layers: int, *, embed: int) -> list[str]:
    """Shapes that do not fit width `embed`; a (3E, E) c_attn is a transposed (Linear) export."""
    problems = []
    mlp = named.get("h.0.mlp.c_fc.weight", np.zeros((embed, 4 * embed))).shape[-1]

    def expect(name: str, shape: tuple[int, ...]) -> None:
        if name in named and named[name].shape != shape:
            hint = " (transposed? GPT-2's Conv1D weights are (in, out))" if len(shape) == 2 else ""
            problems.append(f"{name}: shape {named[name].shape}, expected {shape}{hint}")

    expect("wpe.weight", (named.get("wpe.weight", np.zeros((0, embed))).shape[0], embed))
    expect("ln_f.weight", (embed,))
    expect("ln_f.bias", (embed,))
    for i in range(num_layers):
        h = f"h.{i}."
        for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias"):
            expect(h + n, (embed,))
        expect(h + "attn.c_attn.weight", (embed, 3 * embed))
        expect(h + "attn.c_attn.bias", (3 * embed,))
        expect(h + "attn.c_proj.weight", (embed, embed))
        expect(h + "mlp.c_fc.weight", (embed, mlp))
        expect(h + "mlp.c_fc.bias", (mlp,))
        expect(h + "mlp.c_proj.weight", (mlp, embed))
        expect(h + "mlp.c_proj.bias", (embed,))
    return problems


def hf_gpt2_config(
    *,
    vocab_size: int,
    max_len: int,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int | None = None,
) -> dict[str, Any]:
    """The `config.json` of a transformers GPT2LMHeadModel with accelctl's Transformer dims.

    Written beside an hf_gpt2 model.safetensors, `GPT2LMHeadModel.from_pretrained(folder)`
    builds the same network. Dropout rates are 0: the exported model is for inference.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": max_len,
        "n_embd": embed_dim,
        "n_layer": num_layers,
        "n_head": num_heads,
        "n_inner": mlp_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
    }


def read_hf_gpt2_config(config: Mapping[str, Any]) -> dict[str, int | None]:
    """Check a transformers GPT-2 `config.json` against what accelctl's Transformer computes and
    return the Transformer's dims.

    Args:
        config: the parsed config.json (missing keys take GPT2Config's defaults).
    Returns:
        {"vocab_size", "max_len", "embed_dim", "num_layers", "num_heads", "mlp_dim"}
        (mlp_dim None = 4 * embed_dim), for a model with positions "learned" and tied
        embeddings.
    Raises:
        UserError: every setting accelctl's Transformer cannot reproduce, in one message.
    """
    problems = []
    if config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type {config['model_type']!r}: only gpt2 is supported")
    act = config.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        problems.append(
            f"activation_function {act!r}: accelctl's MLP uses the tanh approximation of gelu "
            f"({' / '.join(_TANH_GELU)})"
        )
    eps = config.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {eps}: accelctl's LayerNorm uses 1e-5")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if config.get(key, want) != want:
            problems.append(f"{key} {config[key]}: accelctl's Transformer needs {want}")
    if problems:
        raise _fail(
            "this GPT-2 computes something accelctl's Transformer does not",
            problems,
            "Only GPT-2 models of the original architecture can be imported.",
        )
    embed = int(config.get("n_embd", 768))
    inner = config.get("n_inner")
    return {
        "vocab_size": int(config.get("vocab_size", 50257)),
        "max_len": int(config.get("n_positions", 1024)),
        "embed_dim": embed,
        "num_layers": int(config.get("n_layer", 12)),
        "num_heads": int(config.get("n_head", 12)),
        "mlp_dim": None if inner is None or int(inner) == 4 * embed else int(inner),
    }
