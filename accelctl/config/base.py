"""The base of every config section: frozen, unknown keys rejected."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: immutable after validation; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
