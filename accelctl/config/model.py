"""The `model` section: one model per `name` (a union keyed on it; a user's own model is
`target` + `args`), with what every model takes: activation checkpointing (`remat`) and the
weights a fresh run starts from (`init_from`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from accelctl.config.base import (
    FRACTION,
    LAYERS,
    LAYERS_MAX,
    SIZE,
    TEXT_MAX,
    Fraction,
    Layers,
    Size,
    Target,
    Text,
)
from accelctl.config.base import Section as _Section

Activation = Literal["relu", "gelu", "silu", "tanh", "sigmoid"]
Remat = Literal["none", "full", "dots", "offload"]


def _remat_field(where: str) -> Any:
    """The `remat` field of a model section; `where` says what one checkpoint covers."""
    return Field(
        "none",
        description="Activation checkpointing: keep fewer activations for the backward pass and "
        f"recompute the rest ({where}). none: keep all; full: keep only the checkpoint's "
        "inputs; dots: also keep matmul outputs without batch dimensions (linear layers; "
        "convolutions and attention scores are recomputed); offload: like dots, kept in host "
        "memory (GPU/TPU only).",
    )


# ---------------------------------------------------------------------------------- init_from
def _weights_path(value: str, info: ValidationInfo) -> str:
    """A weights path made absolute: relative paths are resolved against the config file's
    folder (validation context `base_dir`), as file targets are, so the resolved config in the
    run directory still names the same file."""
    if not value.strip():
        raise ValueError("give the path of a weights file, a run directory or a checkpoint")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path((info.context or {}).get("base_dir") or ".") / path
    return str(path.resolve())


WeightsPath = Annotated[Text, AfterValidator(_weights_path)]
# A glob over flat weight names (`head.*`, `blocks.*.attn.*`).
NamePattern = Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]


class InitFromConfig(_Section):
    path: WeightsPath = Field(
        description="What to start from: a file written by `accelctl export` (safetensors or "
        "npz), a run directory, its checkpoints/ folder or a step folder checkpoints/<step> "
        "(newest good checkpoint; parameters and model state only), or GPT-2 weights in the "
        "Hugging Face layout (a model.safetensors, or a folder with it and config.json). "
        "Relative to the config file's folder; stored absolute."
    )
    format: Literal["auto", "safetensors", "npz", "hf_gpt2", "checkpoint"] = Field(
        "auto",
        description="auto: a folder is a run/checkpoint (or a Hugging Face GPT-2 folder when it "
        "holds config.json and model.safetensors), a file is read by its content (a file of "
        "GPT-2 names, wte.weight, is read as hf_gpt2); hf_gpt2 needs model.name: transformer "
        "with positions: learned and tie_embeddings: true, and its config.json dims must be "
        "the model's.",
    )
    include: tuple[NamePattern, ...] = Field(
        (),
        max_length=LAYERS_MAX,
        description="Load only the weights whose flat name (e.g. blocks.0.attn.query.kernel, "
        "head.bias; see docs/weights.md) matches one of these glob patterns; empty: all.",
    )
    exclude: tuple[NamePattern, ...] = Field(
        (),
        max_length=LAYERS_MAX,
        description="Do not load the weights matching these glob patterns: they keep the "
        "run's own random initialisation (fine-tuning with a new head: exclude: [head.*]).",
    )
    strict: bool = Field(
        True,
        description="Every selected weight of the model must be in the source, every weight of "
        "the source must be in the model (or deselected), and every pattern must match a name; "
        "all problems are listed in one error before anything trains. false: missing weights "
        "keep their random initialisation and unknown ones are ignored (shapes must still fit).",
    )

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        # `init_from: PATH` is short for `init_from: {path: PATH}`.
        return {"path": data} if isinstance(data, str) else data


def _init_from_field() -> Any:
    """The `init_from` field of a model section."""
    return Field(
        None,
        description="Start a fresh run from saved weights instead of the random initialisation "
        "(the optimizer starts fresh): a path (see init_from.path), or {path, format, include, "
        "exclude, strict}. A resumed run restores its checkpoint and ignores this. null: random "
        "initialisation from train.seed.",
    )


# ----------------------------------------------------------------------------------------- model
class MLPConfig(_Section):
    name: Literal["mlp"] = Field(description="Multi-layer perceptron; inputs are flattened.")
    hidden: tuple[Size, ...] = Field(
        (64,),
        max_length=LAYERS_MAX,
        description=f"Width of each hidden layer ({SIZE}; at most {LAYERS_MAX} layers).",
    )
    activation: Activation = Field("relu", description="Non-linearity after each hidden layer.")
    dropout: Fraction = Field(
        0.0, description=f"Dropout rate after each hidden layer, train only ({FRACTION})."
    )
    remat: Remat = _remat_field("one checkpoint around the whole forward pass")
    init_from: InitFromConfig | None = _init_from_field()


class CNNConfig(_Section):
    name: Literal["cnn"] = Field(description="Conv stack (NHWC) followed by a dense head.")
    channels: tuple[Size, ...] = Field(
        (32, 64),
        max_length=LAYERS_MAX,
        description=f"Output channels per conv ({SIZE}; at most {LAYERS_MAX} convs).",
    )
    kernels: Size | tuple[Size, ...] = Field(
        3,
        description=f"Square kernel size ({SIZE}): one for all convs, or one per conv.",
    )
    pool: Literal["max", "avg", "none"] = Field(
        "max", description="2x2 pooling (stride 2) after each conv, or none."
    )
    batch_norm: bool = Field(
        False, description="Batch norm after each conv (running stats in eval)."
    )
    dense: tuple[Size, ...] = Field(
        (128,),
        max_length=LAYERS_MAX,
        description=f"Hidden widths of the dense head ({SIZE}; at most {LAYERS_MAX} layers).",
    )
    activation: Activation = Field("relu", description="Non-linearity after each layer.")
    dropout: Fraction = Field(
        0.0, description=f"Dropout rate in the dense head, train only ({FRACTION})."
    )
    remat: Remat = _remat_field("one checkpoint around the whole forward pass")
    init_from: InitFromConfig | None = _init_from_field()

    @model_validator(mode="after")
    def _kernels_match(self) -> CNNConfig:
        if isinstance(self.kernels, tuple) and len(self.kernels) != len(self.channels):
            raise ValueError(
                f"kernels has {len(self.kernels)} entries but channels has {len(self.channels)}; "
                "give one kernel size per conv or a single number"
            )
        return self


class ResNetConfig(_Section):
    name: Literal["resnet"] = Field(
        description="Residual network (He et al. 2016) with batch norm; NHWC images."
    )
    stage_sizes: tuple[Layers, ...] = Field(
        (3, 3, 3),
        max_length=16,
        description=f"Residual blocks per stage ({LAYERS} each; at most 16 stages); (3, 3, 3) with "
        "basic blocks = ResNet-20.",
    )
    width: Size = Field(
        16,
        description=f"Channels of the first stage ({SIZE}); each later stage doubles them "
        "(stride 2).",
    )
    block: Literal["basic", "bottleneck"] = Field(
        "basic", description="basic: two 3x3 convs; bottleneck: 1x1, 3x3, 1x1 (4x expansion)."
    )
    stem: Literal["cifar", "imagenet"] = Field(
        "cifar",
        description="cifar: one 3x3 conv, stride 1 (small images); imagenet: 7x7 stride 2 + "
        "3x3 max pool.",
    )
    zero_init_residual: bool = Field(
        True, description="Start each block's last batch-norm scale at 0 (block = identity)."
    )
    activation: Activation = Field("relu", description="Non-linearity after each batch norm.")
    remat: Remat = _remat_field("one checkpoint per residual block")
    init_from: InitFromConfig | None = _init_from_field()


class TransformerConfig(_Section):
    name: Literal["transformer"] = Field(
        description="Decoder-only GPT over token ids (data.source: tokens): pre-norm blocks of "
        "causal self-attention and a gelu MLP; logits (batch, T, vocab)."
    )
    num_layers: Layers = Field(2, description=f"Transformer blocks ({LAYERS}).")
    num_heads: Size = Field(4, description=f"Attention heads ({SIZE}); must divide embed_dim.")
    embed_dim: Size = Field(128, description=f"Model width, the embedding size ({SIZE}).")
    mlp_dim: Size | None = Field(
        None, description=f"Hidden width of each block's MLP ({SIZE}); null = 4 * embed_dim."
    )
    max_len: Size = Field(
        1024,
        description=f"Longest sequence in positions ({SIZE}); data.seq_len must not exceed it.",
    )
    positions: Literal["learned", "rotary"] = Field(
        "learned",
        description="learned: a position embedding added to the tokens (GPT-2); rotary: RoPE "
        "applied to queries and keys.",
    )
    tie_embeddings: bool = Field(
        True, description="Logits from the token embedding (x @ E.T) instead of a separate head."
    )
    dropout: Fraction = Field(
        0.0,
        description=f"Dropout rate on the embeddings and residual branches, train only "
        f"({FRACTION}).",
    )
    remat: Remat = _remat_field("one checkpoint per transformer block")
    attention: Literal["auto", "xla", "cudnn"] = Field(
        "auto",
        description="Attention kernel (jax.nn.dot_product_attention's implementation): auto = "
        "JAX's choice; xla = plain XLA ops (any backend); cudnn = cuDNN's fused flash attention "
        "(NVIDIA GPUs, precision.compute bf16 or fp16, head size a multiple of 8).",
    )
    init_from: InitFromConfig | None = _init_from_field()

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                "each head gets embed_dim / num_heads dimensions, so pick values that divide"
            )
        if self.positions == "rotary" and (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"positions: rotary needs an even head size; embed_dim / num_heads = "
                f"{self.embed_dim // self.num_heads}"
            )
        return self


class CustomModelConfig(_Section):
    name: Literal["custom"] = Field(
        "custom",
        description="Set implicitly when `target` is given: the user's own model (leave it out).",
    )
    target: Target = Field(
        description="The user's own model: package.module:Name (importable) or "
        "path/to/file.py:Name (relative to the config file's folder; imported by path, not via "
        "sys.path). Name is a Flax NNX Module class, a factory returning one, or a flax.linen "
        "Module class. It is called as model(x, train=..., rngs=...) and returns logits."
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the target (e.g. input size and class count); "
        "accelctl adds rngs=, and dtype=/param_dtype= when the callable accepts them.",
    )
    remat: Remat = _remat_field("one checkpoint around the whole model call")
    init_from: InitFromConfig | None = _init_from_field()

    @model_validator(mode="after")
    def _args_are_names(self) -> CustomModelConfig:
        bad = [k for k in self.args if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise ValueError(f"args keys must be parameter names; got {bad[0]!r}")
        return self


ModelConfig = Annotated[
    MLPConfig | CNNConfig | ResNetConfig | TransformerConfig | CustomModelConfig,
    Field(discriminator="name"),
]
