"""Config loading: files (or built-in names), `--set` overrides, validation with readable,
located errors, and programmatic copies (`from_dict`, `replace`).

No other module reads YAML (the safe reader itself is `yaml_reader.py`): everything else passes
Config objects.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from accelctl.config.schema import Config
from accelctl.config.source import ConfigError, FieldPath, Source, dotted, printable
from accelctl.config.yaml_reader import MAX_BYTES, MAX_DEPTH, Origin, decode, read_yaml

_MAX_ERRORS_SHOWN = 20


def _parse_yaml(text: str, filename: str, src: Source) -> dict[str, Any]:
    data = read_yaml(text, Origin(filename), src)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{filename}:1:1: the config must be a mapping of sections "
            f"(model, data, optimizer, ...), not a {type(data).__name__}"
        )
    return data


def _apply_override(data: dict[str, Any], item: str, src: Source) -> None:
    shown = printable(item, limit=100)
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = tuple(key.split("."))
    if not sep or not key or any(not part for part in parts):
        raise ConfigError(
            f"--set {shown}: expected KEY=VALUE with a dotted key, e.g. --set optimizer.lr=3e-4"
        )
    if len(parts) > MAX_DEPTH:
        raise ConfigError(
            f"--set {shown}: the key has {len(parts)} dotted parts; fields are at most a few "
            "levels deep (e.g. parallel.mesh.data)"
        )
    origin = Origin(f"--set {shown}", positions=False)
    # The value's own positions (within the item) mean nothing in the file's Source.
    value = read_yaml(raw, origin, Source(origin.name), parts) if raw.strip() else None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {shown}: {dotted(parts[: i + 1])} is a value, not a section; "
                f"set it directly (--set {dotted(parts[: i + 1])}=...)"
            )
        node = child
    node[parts[-1]] = value
    src.overrides[parts] = shown


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
        elif out == ["model"] and part == "custom":
            continue  # the tag a `target` model gets implicitly
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


def _describe(err: dict[str, Any], data: dict[str, Any], src: Source) -> str:
    loc = _clean_loc(err["loc"], data)
    kind = err["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("ctx", {}).get("discriminator", "'name'").strip("'")
        loc = loc + (tag,) if not loc or loc[-1] != tag else loc
    if kind == "extra_forbidden":
        cls = _model_class_at(loc[:-1], data)
        valid = sorted(f.alias or n for n, f in cls.model_fields.items()) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        where = src.where(loc, key=True)
        return f"{where}: {dotted(loc)}: unknown field.{hint} Valid fields: {', '.join(valid)}."
    msg = err["msg"]
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(err["ctx"].get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(err["ctx"].get("tag")), tags, n=1, cutoff=0.5)
        msg = f"unknown {loc[-1]} {err['ctx'].get('tag')!r}; choose one of {_choices(tags)}"
        msg += f" (did you mean '{close[0]}'?)" if close else ""
    elif kind == "union_tag_not_found":
        field = Config.model_fields.get(str(loc[0]))
        tags = (
            [_literal_values(m, str(loc[-1]))[0] for m in _members(field.annotation)]
            if (field and len(loc) == 2)
            else []
        )
        msg = f"missing; choose one of {_choices(tags)}"
    elif kind == "missing":
        msg = "required field is missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind not in ("missing", "union_tag_not_found") and "input" in err:
        shown = repr(err["input"])
        msg += f" (got {shown[:60]})" if not isinstance(err["input"], dict) else ""
    return f"{src.where(loc)}: {dotted(loc)}: {msg}"


_TAGS = _union_tags()


def _choices(tags: list[str]) -> str:
    """The tags a user can write; `custom` is set implicitly by giving a target instead."""
    if "custom" not in tags:
        return ", ".join(tags)
    names = ", ".join(t for t in tags if t != "custom")
    return f"{names}, or no name and target: package.module:Name for your own model"


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
    src = Source(filename)
    data = _parse_yaml(text, filename, src)
    for item in overrides:
        _apply_override(data, item, src)
    return _validate(data, src)


def _validate(data: dict[str, Any], src: Source) -> Config:
    try:
        # Import paths to files (model.target, ...) are relative to the config file's folder.
        cfg = Config.model_validate(data, context={"base_dir": src.base_dir})
    except ValidationError as e:
        errors = e.errors()
        # A long list of wrong values gives one error each; the first ones say enough.
        lines = [_describe(err, data, src) for err in errors[:_MAX_ERRORS_SHOWN]]  # type: ignore[arg-type]
        if len(errors) > _MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more")
        raise ConfigError("Invalid config:\n  " + "\n  ".join(lines)) from None
    cfg._source = src
    return cfg


def from_dict(
    data: dict[str, Any], filename: str = "<config>", overrides: Sequence[str] = ()
) -> Config:
    """Validate a config given as a dict (e.g. a checkpoint's stored `Config.to_dict()`).

    Args:
        data: the sections, as in the YAML file.
        filename: shown in error messages (there are no line numbers).
        overrides: `KEY=VALUE` strings applied first, as for `load_text`.
    Raises:
        ConfigError: as for `load`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: the config must be a mapping of sections")
    src = Source(filename)
    data = copy.deepcopy(data)
    for item in overrides:
        _apply_override(data, item, src)
    return _validate(data, src)


def replace(cfg: Config, updates: Mapping[str, Any], *, merge: bool = True) -> Config:
    """`cfg` with some fields replaced, validated again (errors still point into its file).

    Args:
        cfg: a validated config.
        updates: dotted field -> value, e.g. {"train.steps": 10, "data.cache": "host"}; a value
            for a whole section (a dict) replaces the fields it names and keeps the others.
        merge: False: a dict value replaces its whole section (e.g. another data source).
    Returns:
        A new frozen Config; `cfg` is unchanged.
    """
    data = cfg.to_dict()
    for key, value in updates.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if merge and isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = {**node[parts[-1]], **value}
        else:
            node[parts[-1]] = value
    src = cfg._source or Source("<config>")
    return _validate(data, src)


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, parse and validate a config file, or a built-in config by name.

    Args:
        path: YAML file; when no such file exists and it is a bare name (e.g. `digits_mlp`),
            the built-in config of that name (`accelctl configs` lists them).
        overrides: `--set KEY=VALUE` strings, validated like the file.
    Returns:
        The frozen, validated Config.
    Raises:
        ConfigError: if the file is missing or unreadable, or the config is invalid.
    """
    from accelctl.config import builtin

    p = Path(path)
    shown = printable(str(p))  # an undecodable file name must not break printing the error
    if "\0" in str(path):  # the OS cannot even look such a path up (ValueError from stat)
        raise ConfigError(f"{shown}: a path cannot contain a NUL character")
    try:
        exists = p.exists()
    except OSError:  # e.g. a name too long: opening it below says so
        exists = True
    if not exists and builtin.find(str(path)) is not None:
        name = str(path).removesuffix(".yaml")
        return load_text(builtin.text(name), f"<built-in {name}>", overrides)
    try:
        with p.open("rb") as f:
            # Read one byte past the limit, never the whole file: it may be huge or endless.
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{shown}: config file not found. Check the path, or name a built-in config: "
            f"{', '.join(builtin.names())} (`accelctl configs` lists them)."
        ) from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read the config file: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{shown}: the file is larger than {MAX_BYTES:,} bytes (1 MiB), the most a config "
            "may have; real ones have a few thousand. Check that this is the right file."
        )
    return load_text(decode(raw, shown), shown, overrides)
