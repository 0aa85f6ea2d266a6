"""The one validated configuration: YAML with line numbers, `--set` overrides, pydantic models.

`load()` returns a frozen `Config`; every error it raises is a `ConfigError` naming the file,
line, column and dotted field, with the nearest valid key for typos. Checks that need the runtime
(e.g. the device count) call `Config.error_at(path, msg)` so their messages point at the same
file position.
"""

from accelctl.config.data import (
    AugmentConfig,
    DataConfig,
    DigitsData,
    NpzData,
    PythonData,
    SyntheticData,
    TfdsData,
    TokensData,
)
from accelctl.config.loading import from_dict, load, load_text, replace
from accelctl.config.model import (
    CNNConfig,
    CustomModelConfig,
    InitFromConfig,
    MLPConfig,
    ModelConfig,
    ResNetConfig,
    TransformerConfig,
)
from accelctl.config.schema import (
    CheckpointConfig,
    Config,
    KeepBestConfig,
    MeshConfig,
    OptimizerConfig,
    OutputConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)
from accelctl.config.source import ConfigError

__all__ = [
    "AugmentConfig",
    "CNNConfig",
    "CheckpointConfig",
    "Config",
    "CustomModelConfig",
    "ConfigError",
    "DataConfig",
    "DigitsData",
    "InitFromConfig",
    "KeepBestConfig",
    "MLPConfig",
    "MeshConfig",
    "ModelConfig",
    "NpzData",
    "PythonData",
    "OptimizerConfig",
    "OutputConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "ResNetConfig",
    "ScheduleConfig",
    "SyntheticData",
    "TfdsData",
    "TokensData",
    "TrainConfig",
    "TransformerConfig",
    "from_dict",
    "load",
    "load_text",
    "replace",
]
