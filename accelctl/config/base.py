"""The base of every config section (frozen, unknown keys rejected) and the shared value types.

Every number in the schema has a range, checked when the config is validated, so no value that
the runtime cannot represent (an int32 step counter, int32 labels, numpy and JAX seeds, XLA
shapes) gets past `load()`. The ranges live here, each next to the words the field descriptions
use for it, so the docs and the checks cannot drift apart.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

# The train step counter, labels and batch indices are int32 on the devices.
INT32_MAX = 2**31 - 1
# numpy's default_rng needs seeds >= 0; jax.random.key overflows at 2**63; 32 bits are plenty.
SEED_MAX = 2**32 - 1
# Widths, channels, shape dimensions, device counts: far above any real model, and their
# products stay representable.
SIZE_MAX = 2**20
# Layers (and blocks per stage) of one model, and the entries of a per-layer list.
LAYERS_MAX = 1024
# Token vocabulary and class count: the embedding / logits have this many rows.
VOCAB_MAX = 2**24
# Longest path or name a config may hold (Linux's PATH_MAX).
TEXT_MAX = 4096


class Section(BaseModel):
    """A config section: immutable after validation; unknown keys are errors.

    `allow_inf_nan=False`: YAML spells infinity and NaN (`.inf`, `.nan`) and pydantic would take
    them for any float; no setting here means anything with them, so every float is finite.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _no_control_chars(value: str) -> str:
    for i, ch in enumerate(value):
        if unicodedata.category(ch) == "Cc":
            raise ValueError(
                f"contains the control character U+{ord(ch):04X} at position {i + 1}; remove it "
                "(names and paths are plain text)"
            )
    return value


# The words each description uses for its range (the docs generator shows the description).
COUNT = "1 to 2^31-1"
NON_NEG_COUNT = "0 to 2^31-1"
SEED = "0 to 2^32-1"
SIZE = "1 to 2^20"
LAYERS = "1 to 1024"
FINITE = "finite"
POSITIVE = "finite, > 0"
NON_NEGATIVE = "finite, >= 0"
FRACTION = "0 <= x < 1"
OPEN_FRACTION = "0 < x < 1"

Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
NonNegCount = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Size = Annotated[int, Field(ge=1, le=SIZE_MAX)]
Layers = Annotated[int, Field(ge=1, le=LAYERS_MAX)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegFinite = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
OpenFraction = Annotated[float, Field(gt=0.0, lt=1.0)]
# Paths, names and keys: a control character (e.g. a NUL from a "\0" escape) is never meant and
# would fail deep inside the OS or a library.
Text = Annotated[str, Field(max_length=TEXT_MAX), AfterValidator(_no_control_chars)]


def _import_target(value: str, info: ValidationInfo) -> str:
    """Check `package.module:Name` / `path/to/file.py:Name`; file paths become absolute, resolved
    against the config file's folder (validation context `base_dir`), so the resolved config
    (written into the run directory, read by resume, eval and compare-devices from elsewhere)
    still names the same file."""
    module, sep, attr = value.rpartition(":")
    if not sep or not module.strip() or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(
            "expected package.module:Name (an importable module) or path/to/file.py:Name (a "
            "file, relative to the config file's folder), e.g. my_project.nets:VisionTransformer"
        )
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_absolute():
            base = (info.context or {}).get("base_dir")
            path = Path(base or ".") / path
        return f"{path.resolve()}:{attr}"
    if not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(
            f"{module!r} is neither a dotted module name nor a path ending in .py; write "
            "package.module:Name or path/to/file.py:Name"
        )
    return value


# An import path to a callable (a model class or factory, a data loader, a loss function).
Target = Annotated[
    str,
    Field(max_length=TEXT_MAX),
    AfterValidator(_no_control_chars),
    AfterValidator(_import_target),
]
