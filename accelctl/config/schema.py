"""The config schema: frozen pydantic sections with `extra="forbid"` and described fields."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, PrivateAttr, ValidationInfo, model_validator

from accelctl.config.base import (
    COUNT,
    FRACTION,
    LAYERS,
    LAYERS_MAX,
    NON_NEG_COUNT,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    SIZE,
    SIZE_MAX,
    TEXT_MAX,
    Count,
    Fraction,
    Layers,
    NonNegCount,
    NonNegFinite,
    OpenFraction,
    PositiveFinite,
    Seed,
    Size,
    Target,
    Text,
    _import_target,
)
from accelctl.config.base import Section as _Section
from accelctl.config.data import DataConfig, DigitsData
from accelctl.config.source import ConfigError, Source, dotted

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

# Built-in losses by name; anything else in train.loss is an import path to fn(logits, targets).
LOSS_NAMES = ("cross_entropy", "mse")


def _loss_name_or_target(value: str, info: ValidationInfo) -> str:
    if value in LOSS_NAMES:
        return value
    if ":" not in value:
        raise ValueError(
            f"unknown loss {value!r}; choose {' or '.join(LOSS_NAMES)}, or give an import path "
            "to your own fn(logits, targets) -> per-example loss (package.module:fn or "
            "path/to/file.py:fn)"
        )
    return _import_target(value, info)


# ------------------------------------------------------------------------------------- optimizer
class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop", "lion"] = Field(
        "adam", description="optax optimizer."
    )
    lr: PositiveFinite = Field(
        1e-3, description=f"Peak learning rate, scaled by the schedule ({POSITIVE})."
    )
    momentum: Fraction = Field(0.0, description=f"Momentum for sgd and rmsprop ({FRACTION}).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum > 0).")
    b1: Fraction = Field(0.9, description=f"First-moment decay, adam/adamw/lion ({FRACTION}).")
    b2: Fraction = Field(0.999, description=f"Second-moment decay, adam/adamw/lion ({FRACTION}).")
    eps: PositiveFinite = Field(
        1e-8, description=f"Numerical epsilon, adam/adamw/adagrad/rmsprop ({POSITIVE})."
    )
    decay: Fraction = Field(0.9, description=f"Squared-gradient decay for rmsprop ({FRACTION}).")
    weight_decay: NonNegFinite = Field(
        0.0,
        description=f"Decoupled for adamw/lion; added to the gradient (L2) for the others "
        f"({NON_NEGATIVE}).",
    )
    clip_norm: PositiveFinite | None = Field(
        None, description=f"Clip gradients to this global norm before the update ({POSITIVE})."
    )
    accumulate_steps: Count = Field(
        1,
        description="Split each batch into N micro-batches run one after another and sum their "
        "gradients into one update (same update as the whole batch, less activation memory); "
        f"train.batch_size stays the examples per update ({COUNT}).",
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ValueError("nesterov: true needs name: sgd and momentum > 0")
        return self


class ScheduleConfig(_Section):
    name: Literal["constant", "linear", "cosine", "piecewise", "step", "plateau"] = Field(
        "constant", description="Learning-rate schedule (plateau = ReduceLROnPlateau)."
    )
    warmup_steps: NonNegCount = Field(
        0, description=f"Steps of linear warmup from 0 to lr ({NON_NEG_COUNT})."
    )
    end_factor: NonNegFinite = Field(
        0.0, description=f"linear/cosine: final lr as a fraction of lr ({NON_NEGATIVE})."
    )
    boundaries: tuple[Count, ...] = Field(
        (),
        max_length=LAYERS_MAX,
        description=f"piecewise: steps after warmup at which lr is multiplied ({COUNT}; at most "
        f"{LAYERS_MAX}).",
    )
    factors: tuple[PositiveFinite, ...] = Field(
        (),
        max_length=LAYERS_MAX,
        description=f"piecewise: multiplier applied at each boundary, cumulative ({POSITIVE}).",
    )
    step_every: Count | None = Field(
        None, description=f"step: multiply lr every N steps ({COUNT})."
    )
    gamma: PositiveFinite = Field(
        0.1, description=f"step: multiplier applied every step_every ({POSITIVE})."
    )
    monitor: Literal["eval_loss", "train_loss"] = Field(
        "eval_loss", description="plateau: loss that drives the reduction."
    )
    factor: OpenFraction = Field(
        0.5, description=f"plateau: lr multiplier on a plateau ({OPEN_FRACTION})."
    )
    patience: Count = Field(
        3,
        description="plateau: evaluations (or accumulated train windows) without improvement "
        f"before the lr is multiplied by factor ({COUNT}).",
    )
    cooldown: NonNegCount = Field(
        0, description=f"plateau: waits after a reduction ({NON_NEG_COUNT})."
    )
    rtol: Fraction = Field(
        1e-4, description=f"plateau: relative improvement threshold ({FRACTION})."
    )
    atol: NonNegFinite = Field(
        0.0, description=f"plateau: absolute improvement threshold ({NON_NEGATIVE})."
    )
    min_scale: PositiveFinite = Field(
        1e-3, description=f"plateau: lowest lr multiplier ({POSITIVE})."
    )
    accumulation_size: Count = Field(
        50,
        description=f"plateau with train_loss: steps averaged into one plateau observation "
        f"({COUNT}).",
    )

    @model_validator(mode="after")
    def _schedule_fields(self) -> ScheduleConfig:
        if self.name == "piecewise":
            if not self.boundaries or len(self.boundaries) != len(self.factors):
                raise ValueError("piecewise needs boundaries and factors of the same length")
            if list(self.boundaries) != sorted(set(self.boundaries)):
                raise ValueError("piecewise boundaries must be strictly increasing")
        if self.name == "plateau" and not (self.rtol > 0 or self.atol > 0):
            raise ValueError("plateau needs rtol > 0 or atol > 0 (what counts as an improvement)")
        if self.name == "step" and self.step_every is None:
            raise ValueError("step needs step_every (multiply lr by gamma every N steps)")
        return self


# ----------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    batch_size: Count = Field(
        128,
        description=f"Global batch size over all devices ({COUNT}); must divide by the "
        "data-axis size.",
    )
    epochs: Count | None = Field(
        None,
        description=f"Passes over the training set ({COUNT}); default 10 when steps is not set.",
    )
    steps: Count | None = Field(
        None, description=f"Total steps ({COUNT}); overrides epochs when set."
    )
    seed: Seed = Field(0, description=f"Seed of initialisation, shuffling and dropout ({SEED}).")
    log_every: Count = Field(50, description=f"Steps between metric reads/log lines ({COUNT}).")
    eval_every: Count | None = Field(
        None, description=f"Steps between evaluations ({COUNT}); null = at the end of every epoch."
    )
    eval_batch_size: Count | None = Field(
        None, description=f"Global eval batch size ({COUNT}); null = batch_size."
    )
    loss: Annotated[str, Field(max_length=TEXT_MAX), AfterValidator(_loss_name_or_target)] = Field(
        "cross_entropy",
        description="cross_entropy on logits, mse against one-hot labels, or an import "
        "path (package.module:fn or path/to/file.py:fn) to fn(logits, targets) -> "
        "per-example loss; accuracy is then reported only for integer class targets.",
    )
    label_smoothing: Fraction = Field(
        0.0, description=f"Label smoothing for cross_entropy ({FRACTION})."
    )
    on_nan: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient norm is not finite never updates the state. "
        "stop: end the run (exit 3) naming the step and the last good checkpoint; skip: go on and "
        "count the skipped steps.",
    )
    hang_timeout: (
        Annotated[float, Field(gt=0, le=7 * 24 * 3600, allow_inf_nan=False)]
        | Literal["auto", "off"]
    ) = Field(
        "auto",
        description="Seconds without a finished step (or evaluation batch) after which the run "
        "is taken to be hung: every thread's Python stack is written to stderr and to "
        "<run dir>/hang-<time>.txt and the process exits with code 124, for a scheduler to "
        "restart it. auto: max(10 x the median step time, 300); off: no watchdog; a number: "
        "0 < x <= 604800.",
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_or_steps(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("steps") is not None and data.get("epochs") is not None:
                raise ValueError("set either epochs or steps, not both")
            if data.get("steps") is None and data.get("epochs") is None:
                data = {**data, "epochs": 10}
        return data


class MeshConfig(_Section):
    data: Annotated[int, Field(ge=-1, le=SIZE_MAX)] = Field(
        -1, description=f"Devices on the data axis ({SIZE}); -1 = all remaining."
    )
    model: Size = Field(
        1, description=f"Devices on the model axis, for tensor parallelism (strategy tp; {SIZE})."
    )

    @model_validator(mode="after")
    def _data_size(self) -> MeshConfig:
        if self.data == 0 or self.data < -1:
            raise ValueError("data must be a positive device count or -1 (all remaining)")
        return self


class ParallelConfig(_Section):
    strategy: Literal["dp", "fsdp", "tp", "pmap", "auto"] = Field(
        "dp",
        description="dp: batch split over the data axis, parameters replicated; fsdp: "
        "parameters and optimizer state also split over the data axis (each along its largest "
        "dimension that divides), gathered by XLA when used; tp: weights split over the model "
        "axis by their logical axis names (Megatron column/row), batch over data; pmap: dp "
        "through jax.pmap; auto: dp while the replicated train state takes at most a quarter "
        "of one device's memory, else fsdp.",
    )
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="Mesh axis sizes.")
    num_devices: Size | None = Field(
        None, description=f"Use only the first N visible devices ({SIZE}); null = all."
    )

    @model_validator(mode="after")
    def _model_axis_needs_tp(self) -> ParallelConfig:
        if self.mesh.model > 1 and self.strategy != "tp":
            raise ValueError(
                f"mesh.model: {self.mesh.model} needs strategy: tp (the model axis only "
                "splits weights under tensor parallelism); set mesh.model: 1 or strategy: tp"
            )
        return self


class PrecisionConfig(_Section):
    compute: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Compute dtype of the layers; bf16 needs no loss scaling, fp16 uses "
        "dynamic loss scaling (overflowing steps are skipped and counted).",
    )
    params: Literal["fp32"] = Field("fp32", description="Parameter and optimizer-state dtype.")
    # float32 on the devices: bounded well inside its range (3.4e38) so doubling stays finite.
    loss_scale: Annotated[float, Field(gt=0.0, le=2.0**64)] = Field(
        2.0**15, description="fp16: initial loss scale, a power of two (> 0 to 2^64)."
    )
    growth_interval: Count = Field(
        2000,
        description=f"fp16: double the loss scale after this many overflow-free steps ({COUNT}).",
    )


class KeepBestConfig(_Section):
    metric: Literal["eval_loss", "eval_accuracy"] = Field(
        description="Eval metric that ranks checkpoints taken right after an evaluation."
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="min or max is best; null = min for eval_loss, max for eval_accuracy."
    )

    @property
    def best_is_max(self) -> bool:
        return (self.mode or ("max" if self.metric == "eval_accuracy" else "min")) == "max"


class CheckpointConfig(_Section):
    enabled: bool = Field(True, description="Write checkpoints under <run dir>/checkpoints/.")
    every_steps: Count | None = Field(None, description=f"Save every N steps ({COUNT}).")
    every_epochs: Count | None = Field(
        1, description=f"Save at the end of every N epochs ({COUNT}; null: only every_steps)."
    )
    keep: Count = Field(3, description=f"Keep the newest N checkpoints ({COUNT}).")
    keep_best: KeepBestConfig | None = Field(
        None, description="Also keep the best checkpoint by an eval metric."
    )
    async_: bool = Field(
        True,
        alias="async",
        description="Write in a background thread; training waits only for the device-to-host "
        "copy.",
    )
    resume: Literal["never", "auto"] = Field(
        "never",
        description="auto: when the run directory holds a checkpoint, continue from it (as "
        "--resume does); otherwise start fresh.",
    )


class OutputConfig(_Section):
    root: Text = Field("runs", description="Parent folder of default run directories.")
    name: Text | None = Field(None, description="Run name prefix; null = the config file's name.")
    tensorboard: bool = Field(
        True, description="Also write TensorBoard event files into <run dir>/tensorboard/."
    )


class Config(_Section):
    model: ModelConfig = Field(
        default_factory=lambda: MLPConfig(name="mlp"),
        description="A built-in model by name (mlp, cnn, resnet, transformer), or the user's "
        "own by import path (target + args).",
    )
    data: DataConfig = Field(
        default_factory=lambda: DigitsData(source="digits"), description="Data source."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Sharding.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Dtypes.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints and resume."
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run directory.")

    _source: Source | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _own_model_has_no_name(cls, data: Any) -> Any:
        # `model: {target: ..., args: ...}` needs no name: it selects CustomModelConfig.
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = data["model"]
            if "target" in model and "name" not in model:
                data = {**data, "model": {"name": "custom", **model}}
        return data

    def error_at(self, path: Sequence[str | int], message: str) -> ConfigError:
        """Build a ConfigError for a runtime check, located like a validation error.

        Args:
            path: dotted field path, e.g. ("train", "batch_size").
            message: what is wrong and how to fix it.
        Returns:
            The error (raise it).
        """
        source = self._source or Source("<config>")
        return ConfigError(f"{source.where(tuple(path))}: {dotted(path)}: {message}")

    def to_yaml(self) -> str:
        """Return the resolved config as YAML (what the run directory stores)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved config as plain JSON types, keyed as in the YAML file."""
        return self.model_dump(mode="json", by_alias=True)
