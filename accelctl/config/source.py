"""Where each config value came from, and the error type that points there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from accelctl.errors import UserError

FieldPath = tuple[str | int, ...]


class ConfigError(UserError):
    """The config file or a `--set` override is invalid."""


class Source:
    """Where each field of the raw config came from: file positions and `--set` overrides."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.values: dict[FieldPath, tuple[int, int]] = {}
        self.keys: dict[FieldPath, tuple[int, int]] = {}
        self.overrides: dict[FieldPath, str] = {}

    @property
    def base_dir(self) -> str:
        """The folder relative paths in the config are resolved against: the config file's
        own, or the working directory for text that came from no file (`<...>`, `--set`)."""
        if self.filename.startswith(("<", "--set")):
            return "."
        return str(Path(self.filename).parent)

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


def dotted(path: Sequence[str | int]) -> str:
    """A field path as the user writes it: `model.hidden[0]`."""
    out = ""
    for part in path:
        text = printable(str(part), limit=60)
        out += f"[{text}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out or "<root>"


def printable(text: str, *, limit: int | None = None) -> str:
    """`text` as an error message may show it: control characters escaped (a terminal would act
    on them), and cut after `limit` characters with the full length said."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    if limit is not None and len(shown) > limit:
        return f"{shown[:limit]}... ({len(text):,} characters)"
    return shown
