"""The config schema: frozen pydantic sections with `extra="forbid"` and described fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, PrivateAttr, ValidationInfo, model_validator

from accelctl.config.base import (
    COUNT,
    FRACTION,
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
    NonNegCount,
    NonNegFinite,
    OpenFraction,
    PositiveFinite,
    Seed,
    Size,
    Text,
    _import_target,
)
from accelctl.config.base import Section as _Section
from accelctl.config.data import DataConfig, DigitsData
from accelctl.config.model import (
    MLPConfig,
    ModelConfig,
)
from accelctl.config.source import ConfigError, Source, dotted

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
