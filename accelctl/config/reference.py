"""The config reference (docs/config.md), generated from the schema's own descriptions, so the
documentation of every field (its type, default and range) cannot drift from what is checked.

    python scripts/gen_config_docs.py          # rewrites docs/config.md
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from accelctl.config.schema import Config

_INTRO = """\
# Config reference

Generated from `accelctl/config/schema.py`, `model.py` and `data.py` by
`python scripts/gen_config_docs.py` (a test fails when this file is out of date). A config is a
YAML mapping of the sections below; every field is optional unless marked *required*, unknown
fields are errors, and `--set SECTION.FIELD=VALUE` sets one field from the command line (the
value is read as YAML and checked like the file). The built-in configs (`accelctl configs`) are
commented examples.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" \\| null" if type(None) in args else "")
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        return {"int": "integer", "float": "number", "str": "text", "bool": "true \\| false"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(section defaults)"
        return f"`{value}`" if value not in ({}, []) else "empty"
    value = field.default
    if value is PydanticUndefined:
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    return f"`{value}`"


def _row(name: str, field: FieldInfo) -> str:
    desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return (
        f"| `{field.alias or name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"
    )


def _table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        lines.append(_row(name, field))
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((field.alias or name, ann))
        for arg in typing.get_args(ann):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                nested.append((field.alias or name, arg))
    for sub_name, sub in nested:
        lines += ["", f"`{sub_name}` holds:", "", *_table(sub)]
    return lines


def _members(annotation: Any) -> list[type[BaseModel]]:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return [a for a in typing.get_args(annotation) if isinstance(a, type)]


def render_markdown() -> str:
    """The whole reference as Markdown."""
    out = [_INTRO]
    for section, field in Config.model_fields.items():
        out += [f"## `{section}`", "", (field.description or "").strip(), ""]
        members = _members(field.annotation)
        if len(members) > 1:  # a union picked by `name` (models) or `source` (data)
            tag = "name" if "name" in members[0].model_fields else "source"
            for member in members:
                value = typing.get_args(member.model_fields[tag].annotation)[0]
                head = f"### `{section}.{tag}: {value}`"
                if value == "custom":
                    head = f"### `{section}` with `target` (your own model; no `name`)"
                out += [head, "", (member.model_fields[tag].description or "").strip(), ""]
                out += [*_table(member, skip=(tag,)), ""]
        else:
            out += [*_table(field.annotation), ""]
    return "\n".join(out).rstrip() + "\n"
