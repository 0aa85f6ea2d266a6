"""The built-in configs, shipped inside the package (`accelctl/configs/*.yaml`), so a wheel
install has them: `accelctl train digits_mlp` works without a checkout, and `accelctl configs`
lists them and copies one out for editing.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def _folder() -> Traversable:
    return resources.files("accelctl") / "configs"


def names() -> list[str]:
    """The built-in configs' names (file stems), sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def find(name: str) -> Traversable | None:
    """The built-in config called `name` (with or without `.yaml`), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if "/" in stem or "\\" in stem or stem not in names():
        return None
    return _folder() / f"{stem}.yaml"


def text(name: str) -> str:
    """The YAML text of a built-in config.

    Raises:
        KeyError: no built-in config has that name.
    """
    found = find(name)
    if found is None:
        raise KeyError(name)
    return found.read_text(encoding="utf-8")


def first_comment(name: str) -> str:
    """The first sentence of a built-in config's leading comment (its description)."""
    lines = []
    for line in text(name).splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    joined = " ".join(lines)
    end = joined.find(". ")
    return joined[: end + 1] if end >= 0 else joined
