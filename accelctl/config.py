"""The one validated configuration: YAML with line numbers, `--set` overrides, pydantic models.

No other module reads YAML. `load()` returns a frozen `Config`; every error it raises is a
`ConfigError` naming the file, line, column and dotted field, with the nearest valid key for typos.
Checks that need the runtime (e.g. the device count) call `Config.error_at(path, msg)` so their
messages point at the same file position.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from accelctl.errors import UserError

FieldPath = tuple[str | int, ...]


class ConfigError(UserError):
    """The config file or a `--set` override is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Activation = Literal["relu", "gelu", "silu", "tanh", "sigmoid"]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


# ----------------------------------------------------------------------------------------- model
class MLPConfig(_Section):
    name: Literal["mlp"] = Field(description="Multi-layer perceptron; inputs are flattened.")
    hidden: tuple[PositiveInt, ...] = Field((64,), description="Width of each hidden layer.")
    activation: Activation = Field("relu", description="Non-linearity after each hidden layer.")
    dropout: Fraction = Field(0.0, description="Dropout rate after each hidden layer (train only).")


class CNNConfig(_Section):
    name: Literal["cnn"] = Field(description="Conv stack (NHWC) followed by a dense head.")
    channels: tuple[PositiveInt, ...] = Field((32, 64), description="Output channels per conv.")
    kernels: PositiveInt | tuple[PositiveInt, ...] = Field(
        3, description="Square kernel size: one for all convs, or one per conv."
    )
    pool: Literal["max", "avg", "none"] = Field(
        "max", description="2x2 pooling (stride 2) after each conv, or none."
    )
    batch_norm: bool = Field(
        False, description="Batch norm after each conv (running stats in eval)."
    )
    dense: tuple[PositiveInt, ...] = Field((128,), description="Hidden widths of the dense head.")
    activation: Activation = Field("relu", description="Non-linearity after each layer.")
    dropout: Fraction = Field(0.0, description="Dropout rate in the dense head (train only).")

    @model_validator(mode="after")
    def _kernels_match(self) -> CNNConfig:
        if isinstance(self.kernels, tuple) and len(self.kernels) != len(self.channels):
            raise ValueError(
                f"kernels has {len(self.kernels)} entries but channels has {len(self.channels)}; "
                "give one kernel size per conv or a single number"
            )
        return self


ModelConfig = Annotated[MLPConfig | CNNConfig, Field(discriminator="name")]


# ------------------------------------------------------------------------------------------ data
class _DataCommon(_Section):
    prefetch: PositiveInt = Field(
        2, description="Batches kept ready on the devices by the background prefetch thread."
    )


class DigitsData(_DataCommon):
    source: Literal["digits"] = Field(
        description="scikit-learn's bundled 8x8 handwritten digits (1797 images, no download)."
    )
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.2, description="Fraction held out for evaluation (deterministic split)."
    )
    split_seed: int = Field(0, description="Seed of the train/eval split.")


class SyntheticData(_DataCommon):
    source: Literal["synthetic"] = Field(
        description="Random inputs; labels from a fixed random linear teacher, so it is learnable."
    )
    shape: tuple[PositiveInt, ...] = Field((28, 28, 1), description="Shape of one example.")
    num_classes: Annotated[int, Field(ge=2)] = Field(10, description="Number of classes.")
    num_train: PositiveInt = Field(4096, description="Training examples.")
    num_eval: PositiveInt = Field(1024, description="Evaluation examples.")
    dtype: Literal["uint8", "float32"] = Field(
        "uint8", description="uint8 images are normalised on device; float32 are used as is."
    )
    seed: int = Field(0, description="Seed of the generated data.")


class NpzData(_DataCommon):
    source: Literal["npz"] = Field(description="A user's arrays in a NumPy .npz file.")
    path: str = Field(description="Path of the .npz file with the training (or all) examples.")
    eval_path: str | None = Field(
        None, description="Optional .npz with the eval examples; else eval_fraction is held out."
    )
    x_key: str = Field("x", description="Array name of the inputs, shape (N, ...).")
    y_key: str = Field("y", description="Array name of the integer class labels, shape (N,).")
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.2, description="Fraction held out for evaluation when eval_path is not given."
    )
    split_seed: int = Field(0, description="Seed of the train/eval split.")


DataConfig = Annotated[DigitsData | SyntheticData | NpzData, Field(discriminator="source")]


# ------------------------------------------------------------------------------------- optimizer
class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "adagrad", "rmsprop", "lion"] = Field(
        "adam", description="optax optimizer."
    )
    lr: PositiveFloat = Field(1e-3, description="Peak learning rate (the schedule scales it).")
    momentum: Fraction = Field(0.0, description="Momentum for sgd and rmsprop.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum > 0).")
    b1: Fraction = Field(0.9, description="First-moment decay (adam, adamw, lion).")
    b2: Fraction = Field(0.999, description="Second-moment decay (adam, adamw, lion).")
    eps: PositiveFloat = Field(
        1e-8, description="Numerical epsilon (adam, adamw, adagrad, rmsprop)."
    )
    decay: Fraction = Field(0.9, description="Squared-gradient decay for rmsprop.")
    weight_decay: NonNegativeFloat = Field(
        0.0,
        description="Decoupled for adamw/lion; added to the gradient (L2) for the others.",
    )
    clip_norm: PositiveFloat | None = Field(
        None, description="Clip gradients to this global norm before the update."
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
    warmup_steps: NonNegativeInt = Field(0, description="Linear warmup from 0 to lr.")
    end_factor: NonNegativeFloat = Field(
        0.0, description="linear/cosine: final lr as a fraction of lr."
    )
    boundaries: tuple[PositiveInt, ...] = Field(
        (), description="piecewise: steps (after warmup) at which lr is multiplied."
    )
    factors: tuple[PositiveFloat, ...] = Field(
        (), description="piecewise: multiplier applied at each boundary (cumulative)."
    )
    step_every: PositiveInt | None = Field(None, description="step: multiply lr every N steps.")
    gamma: PositiveFloat = Field(0.1, description="step: multiplier applied every step_every.")
    monitor: Literal["eval_loss", "train_loss"] = Field(
        "eval_loss", description="plateau: loss that drives the reduction."
    )
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5, description="plateau: lr multiplier on a plateau."
    )
    patience: PositiveInt = Field(
        3,
        description="plateau: evaluations (or accumulated train windows) without improvement "
        "before the lr is multiplied by factor.",
    )
    cooldown: NonNegativeInt = Field(0, description="plateau: waits after a reduction.")
    rtol: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        1e-4, description="plateau: relative improvement threshold (0..1)."
    )
    atol: NonNegativeFloat = Field(0.0, description="plateau: absolute improvement threshold.")
    min_scale: PositiveFloat = Field(1e-3, description="plateau: lowest lr multiplier.")
    accumulation_size: PositiveInt = Field(
        50, description="plateau with train_loss: steps averaged into one plateau observation."
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
    batch_size: PositiveInt = Field(
        128, description="Global batch size (all devices); must divide by the data-axis size."
    )
    epochs: PositiveInt | None = Field(
        None, description="Passes over the training set; default 10 when steps is not set."
    )
    steps: PositiveInt | None = Field(None, description="Total steps; overrides epochs when set.")
    seed: int = Field(0, description="Seed of initialisation, shuffling and dropout.")
    log_every: PositiveInt = Field(50, description="Steps between metric reads/log lines.")
    eval_every: PositiveInt | None = Field(
        None, description="Steps between evaluations; null = at the end of every epoch."
    )
    eval_batch_size: PositiveInt | None = Field(
        None, description="Global eval batch size; null = batch_size."
    )
    loss: Literal["cross_entropy", "mse"] = Field(
        "cross_entropy", description="cross_entropy on logits, or mse against one-hot labels."
    )
    label_smoothing: Fraction = Field(0.0, description="Label smoothing for cross_entropy.")

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
    data: int = Field(-1, description="Devices on the data axis; -1 = all remaining.")
    model: Literal[1] = Field(1, description="Devices on the model axis (1 until tp exists).")

    @model_validator(mode="after")
    def _data_size(self) -> MeshConfig:
        if self.data == 0 or self.data < -1:
            raise ValueError("data must be a positive device count or -1 (all remaining)")
        return self


class ParallelConfig(_Section):
    strategy: Literal["dp"] = Field(
        "dp", description="dp: batch sharded over the data axis, parameters replicated."
    )
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="Mesh axis sizes.")
    num_devices: PositiveInt | None = Field(
        None, description="Use only the first N visible devices; null = all."
    )


class PrecisionConfig(_Section):
    compute: Literal["fp32"] = Field("fp32", description="Compute dtype.")
    params: Literal["fp32"] = Field("fp32", description="Parameter and optimizer-state dtype.")


class OutputConfig(_Section):
    root: str = Field("runs", description="Parent folder of default run directories.")
    name: str | None = Field(None, description="Run name prefix; null = the config file's name.")


class Config(_Section):
    model: ModelConfig = Field(
        default_factory=lambda: MLPConfig(name="mlp"), description="Model by registry name."
    )
    data: DataConfig = Field(
        default_factory=lambda: DigitsData(source="digits"), description="Data source."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Sharding.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Dtypes.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run directory.")

    _source: _Source | None = PrivateAttr(default=None)

    def error_at(self, path: Sequence[str | int], message: str) -> ConfigError:
        """Build a ConfigError for a runtime check, located like a validation error.

        Args:
            path: dotted field path, e.g. ("train", "batch_size").
            message: what is wrong and how to fix it.
        Returns:
            The error (raise it).
        """
        source = self._source or _Source("<config>")
        return ConfigError(f"{source.where(tuple(path))}: {_dotted(path)}: {message}")

    def to_yaml(self) -> str:
        """Return the resolved config as YAML (what the run directory stores)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------ loading with lines
class _Source:
    """Where each field of the raw config came from: file positions and `--set` overrides."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.values: dict[FieldPath, tuple[int, int]] = {}
        self.keys: dict[FieldPath, tuple[int, int]] = {}
        self.overrides: dict[FieldPath, str] = {}

    def where(self, path: FieldPath, *, key: bool = False) -> str:
        for item_path, item in self.overrides.items():
            if item_path[: len(path)] == path:
                return f"--set {item}"
        for i in range(len(path), -1, -1):
            prefix = path[:i]
            if prefix in self.overrides:
                return f"--set {self.overrides[prefix]}"
            pos = (self.keys if key else self.values).get(prefix) or self.values.get(prefix)
            if pos is not None:
                return f"{self.filename}:{pos[0]}:{pos[1]}"
        return self.filename


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: FieldPath, src: _Source) -> Any:
    src.values[path] = _mark(node)
    default_tag = {yaml.MappingNode: "map", yaml.SequenceNode: "seq"}.get(type(node))
    if default_tag and node.tag != f"tag:yaml.org,2002:{default_tag}":
        line, col = _mark(node)
        raise ConfigError(
            f"{src.filename}:{line}:{col}: {_dotted(path)}: the tag {node.tag!r} is not allowed; "
            "only plain YAML values are accepted"
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<) like safe_load does
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                line, col = _mark(key_node)
                raise ConfigError(f"{src.filename}:{line}:{col}: mapping keys must be plain names")
            if key in out:
                line, col = _mark(key_node)
                first = src.keys[path + (key,)]
                raise ConfigError(
                    f"{src.filename}:{line}:{col}: {_dotted(path + (key,))}: duplicate key "
                    f"(first given at line {first[0]}); keep one of them"
                )
            src.keys[path + (key,)] = _mark(key_node)
            out[key] = _construct(loader, value_node, path + (key,), src)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, v, path + (i,), src) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _parse_yaml(text: str, filename: str, src: _Source) -> dict[str, Any]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = {} if node is None else _construct(loader, node, (), src)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(
            f"{where}: YAML error: {problem}. Fix the syntax (only plain YAML is accepted: "
            "no Python tags)."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{filename}: YAML error: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(
            f"{filename}:1:1: the config must be a mapping of sections "
            "(model, data, optimizer, ...), not a {type(data).__name__}"
        )
    return data


def _apply_override(data: dict[str, Any], item: str, src: _Source) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set optimizer.lr=3e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({e})") from None
    parts = tuple(key.split("."))
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {item}: {_dotted(parts[: i + 1])} is a value, not a section; "
                f"set it directly (--set {_dotted(parts[: i + 1])}=...)"
            )
        node = child
    node[parts[-1]] = value
    src.overrides[parts] = item


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _clean_loc(loc: Sequence[str | int], data: Any) -> FieldPath:
    """Drop the union-tag elements pydantic inserts (model.mlp.hidden -> model.hidden)."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and part in cur.values() and part in _TAGS:
            continue  # the discriminator value
        else:
            out.append(part)
            cur = None
    return tuple(out)


def _model_class_at(path: FieldPath, data: Any) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path` (union members picked by tag)."""
    cls: type[BaseModel] = Config
    cur = data
    for part in path:
        field = cls.model_fields.get(str(part))
        cur = cur.get(part) if isinstance(cur, dict) else None
        if field is None:
            return None
        members = _members(field.annotation)
        chosen = None
        for member in members:
            tag = next((n for n in ("name", "source") if n in member.model_fields), None)
            if len(members) == 1 or (
                tag and isinstance(cur, dict) and cur.get(tag) in _literal_values(member, tag)
            ):
                chosen = member
        if chosen is None:
            return None
        cls = chosen
    return cls


def _union_tags() -> frozenset[str]:
    tags = set()
    for name in ("model", "data"):
        for member in _members(Config.model_fields[name].annotation):
            for tag in ("name", "source"):
                if tag in member.model_fields:
                    tags.update(_literal_values(member, tag))
    return frozenset(tags)


def _members(annotation: Any) -> list[type[BaseModel]]:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args: Iterable[Any] = typing.get_args(annotation)
    else:
        args = (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _literal_values(cls: type[BaseModel], name: str) -> tuple[Any, ...]:
    return typing.get_args(cls.model_fields[name].annotation)


def _describe(err: dict[str, Any], data: dict[str, Any], src: _Source) -> str:
    loc = _clean_loc(err["loc"], data)
    kind = err["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("ctx", {}).get("discriminator", "'name'").strip("'")
        loc = loc + (tag,) if not loc or loc[-1] != tag else loc
    if kind == "extra_forbidden":
        cls = _model_class_at(loc[:-1], data)
        valid = sorted(cls.model_fields) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        where = src.where(loc, key=True)
        return f"{where}: {_dotted(loc)}: unknown field.{hint} Valid fields: {', '.join(valid)}."
    msg = err["msg"]
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(err["ctx"].get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(err["ctx"].get("tag")), tags, n=1, cutoff=0.5)
        msg = f"unknown {loc[-1]} {err['ctx'].get('tag')!r}; choose one of {', '.join(tags)}"
        msg += f" (did you mean '{close[0]}'?)" if close else ""
    elif kind == "union_tag_not_found":
        field = Config.model_fields.get(str(loc[0]))
        tags = (
            [_literal_values(m, str(loc[-1]))[0] for m in _members(field.annotation)]
            if (field and len(loc) == 2)
            else []
        )
        msg = f"missing; choose one of {', '.join(tags)}"
    elif kind == "missing":
        msg = "required field is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind not in ("missing", "union_tag_not_found") and "input" in err:
        shown = repr(err["input"])
        msg += f" (got {shown[:60]})" if not isinstance(err["input"], dict) else ""
    return f"{src.where(loc)}: {_dotted(loc)}: {msg}"


_TAGS = _union_tags()


def load_text(text: str, filename: str = "<config>", overrides: Sequence[str] = ()) -> Config:
    """Parse and validate a config given as YAML text.

    Args:
        text: the YAML document (plain YAML; Python tags are rejected).
        filename: shown in error messages.
        overrides: `KEY=VALUE` strings applied after the file, values parsed as YAML scalars.
    Returns:
        The frozen, validated Config.
    Raises:
        ConfigError: with file:line:col, dotted field and a fix for every problem found.
    """
    src = _Source(filename)
    data = _parse_yaml(text, filename, src)
    for item in overrides:
        _apply_override(data, item, src)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, data, src) for err in e.errors()]  # type: ignore[arg-type]
        raise ConfigError("Invalid config:\n  " + "\n  ".join(lines)) from None
    cfg._source = src
    return cfg


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, parse and validate a config file.

    Args:
        path: YAML file.
        overrides: `--set KEY=VALUE` strings, validated like the file.
    Returns:
        The frozen, validated Config.
    Raises:
        ConfigError: if the file is missing or unreadable, or the config is invalid.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: config file not found. Check the path (see configs/ for examples)."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}") from None
    return load_text(text, str(p), overrides)
