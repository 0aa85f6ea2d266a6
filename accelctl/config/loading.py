"""YAML loading with line numbers, `--set` overrides, and readable validation errors.

No other module reads YAML. Values are built from SafeLoader nodes so every field keeps its
file:line:col; duplicate keys and non-plain tags are rejected before anything is constructed.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from accelctl.config.schema import Config
from accelctl.config.source import ConfigError, FieldPath, Source, dotted


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: FieldPath, src: Source) -> Any:
    src.values[path] = _mark(node)
    default_tag = {yaml.MappingNode: "map", yaml.SequenceNode: "seq"}.get(type(node))
    if default_tag and node.tag != f"tag:yaml.org,2002:{default_tag}":
        line, col = _mark(node)
        raise ConfigError(
            f"{src.filename}:{line}:{col}: {dotted(path)}: the tag {node.tag!r} is not allowed; "
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
                    f"{src.filename}:{line}:{col}: {dotted(path + (key,))}: duplicate key "
                    f"(first given at line {first[0]}); keep one of them"
                )
            src.keys[path + (key,)] = _mark(key_node)
            out[key] = _construct(loader, value_node, path + (key,), src)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, v, path + (i,), src) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _parse_yaml(text: str, filename: str, src: Source) -> dict[str, Any]:
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


def _apply_override(data: dict[str, Any], item: str, src: Source) -> None:
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
                f"--set {item}: {dotted(parts[: i + 1])} is a value, not a section; "
                f"set it directly (--set {dotted(parts[: i + 1])}=...)"
            )
        node = child
    node[parts[-1]] = value
    src.overrides[parts] = item


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
    return f"{src.where(loc)}: {dotted(loc)}: {msg}"


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
    src = Source(filename)
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
