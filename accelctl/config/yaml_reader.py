"""Reading YAML safely: the parser's events composed, without recursion, into nodes that keep
their file:line:col, and plain values built from them.

Anything that would hang, exhaust memory or overflow the stack later (control characters,
nesting deeper than `MAX_DEPTH`, self-referencing aliases, alias bombs, huge files or numbers)
is refused while composing, with the position of the culprit. Duplicate keys and non-plain tags
are rejected before anything is constructed. `config/loading.py` is the only user.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import yaml

from accelctl.config.source import ConfigError, FieldPath, Source, dotted, printable

# Limits no real config comes near (they are a few KB, ~100 values, ~4 levels deep). They make a
# wrong file, a typo or a hostile input fail at once with a located message instead of hanging,
# eating memory or overflowing the stack; every check runs before the part it protects.
MAX_BYTES = 1 << 20  # 1 MiB, checked before parsing
MAX_DEPTH = 64  # lists/maps inside each other, aliases expanded
# Values after expanding aliases (every use of *name counts its anchor again); reading costs
# about 10 us a value, so this bound keeps the worst case near 0.2 s.
MAX_VALUES = 20_000
MAX_NUMBER_CHARS = 100  # longer "numbers" are typos; Python refuses >4300-digit ints anyway

_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _MERGE, _VALUE = (f"{_TAG}{t}" for t in ("map", "seq", "merge", "value"))
_NUMBER_TAGS = {f"{_TAG}int", f"{_TAG}float"}
_SCALAR_TAGS = _NUMBER_TAGS | {f"{_TAG}{t}" for t in ("null", "bool", "str", "timestamp")}
# YAML's printable set; PyYAML's reader rejects the rest without a line number.
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
# libyaml's parser when PyYAML has it (about 20x faster than the pure-Python one it falls back
# to); composing and constructing stay in Python, so both behave the same.
_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Origin:
    """Where a YAML text came from: a config file, or the value of one `--set` item.

    A file's errors carry file:line:col; a `--set` value is one short line, so its errors name
    the item itself.
    """

    name: str
    positions: bool = True

    def at(self, line: int, col: int) -> str:
        return f"{self.name}:{line}:{col}" if self.positions else self.name

    def mark(self, mark: yaml.Mark | None) -> str:
        return self.at(mark.line + 1, mark.column + 1) if mark is not None else self.name


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check_text(text: str, origin: Origin) -> None:
    what = "config" if origin.positions else "value"
    if len(text) > MAX_BYTES:
        raise ConfigError(
            f"{origin.name}: the {what} is {len(text):,} characters long; a config may have at "
            f"most {MAX_BYTES:,} (1 MiB) and real ones have a few thousand. Check that this is "
            "the right file."
        )
    bad = _NON_PRINTABLE.search(text)
    if bad:
        lines = _LINE_BREAK.split(text[: bad.start()])
        char = bad.group()
        kind = "control character" if unicodedata.category(char) == "Cc" else "character"
        raise ConfigError(
            f"{origin.at(len(lines), len(lines[-1]) + 1)}: the {kind} U+{ord(char):04X} "
            f"({ascii(char)}) is not allowed in YAML. Delete it (such characters come from "
            "binary files, wrong encodings or copy-paste)."
        )


@dataclass
class _Open:
    """A collection being composed."""

    node: yaml.CollectionNode
    anchor: str | None
    start: int  # values composed before it
    height: int = 0  # levels of collections below it (aliases expanded)
    key: yaml.Node | None = None  # a mapping's key waiting for its value


@dataclass
class _Composer:
    """The node graph of one YAML document, composed from parser events without recursion.

    PyYAML's own composer recurses once per level (a few hundred `[` overflow the stack) and
    resolves aliases to shared nodes, which a later walk would expand exponentially; here the
    depth and the expanded size are counted as the events arrive and bounded.
    """

    origin: Origin
    resolver: yaml.resolver.Resolver = field(default_factory=yaml.resolver.Resolver)
    anchors: dict[str, tuple[yaml.Node, int, int]] = field(default_factory=dict)
    stack: list[_Open] = field(default_factory=list)
    values: int = 0
    root: yaml.Node | None = None

    def compose(self, text: str) -> yaml.Node | None:
        documents = 0
        for event in yaml.parse(text, Loader=_PARSER):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError(
                        f"{self.origin.mark(event.start_mark)}: a second YAML document; a config "
                        "is one document, so delete this '---' and what follows (or merge them)"
                    )
            elif isinstance(event, yaml.AliasEvent):
                self._alias(event)
            elif isinstance(event, yaml.ScalarEvent):
                tag = self._tag(event, yaml.ScalarNode, event.value)
                node = yaml.ScalarNode(
                    tag, event.value, event.start_mark, event.end_mark, style=event.style
                )
                self._count(1, event)
                self._anchor(event, node, 1, 0)
                self._attach(node, 0)
            elif isinstance(event, yaml.CollectionStartEvent):
                kind = (
                    yaml.SequenceNode
                    if isinstance(event, yaml.SequenceStartEvent)
                    else yaml.MappingNode
                )
                tag = self._tag(event, kind, None)
                node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
                self._depth(len(self.stack) + 1, event)
                self._anchor(event, None, 0, 0)  # duplicate check; registered when complete
                self.stack.append(_Open(node, event.anchor, self.values))
                self._count(1, event)
            elif isinstance(event, yaml.CollectionEndEvent):
                done = self.stack.pop()
                done.node.end_mark = event.end_mark
                height = done.height + 1
                self._anchor_open(done, height)
                self._attach(done.node, height)
        return self.root

    def _tag(self, event: Any, kind: type[yaml.Node], value: str | None) -> str:
        if event.tag is None or event.tag == "!":
            return self.resolver.resolve(kind, value, event.implicit)
        return event.tag

    def _count(self, n: int, event: yaml.Event) -> None:
        self.values += n
        if self.values > MAX_VALUES:
            raise ConfigError(
                f"{self.origin.mark(event.start_mark)}: the config grows to more than "
                f"{MAX_VALUES:,} values here (each use of an alias *name copies its anchor "
                "again, so nested aliases multiply); real configs have about a hundred. Remove "
                "the repeated aliases or the long lists."
            )

    def _depth(self, depth: int, event: yaml.Event) -> None:
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{self.origin.mark(event.start_mark)}: lists and mappings are nested more than "
                f"{MAX_DEPTH} deep here (aliases expanded); a config needs a few levels. Look "
                "for unclosed brackets or an alias that nests its anchor again."
            )

    def _anchor(self, event: Any, node: yaml.Node | None, size: int, height: int) -> None:
        name = event.anchor
        if name is None:
            return
        earlier = self.anchors.get(name)
        first = earlier[0].start_mark if earlier else None
        if first is None:
            first = next((o.node.start_mark for o in self.stack if o.anchor == name), None)
        if first is not None:
            raise ConfigError(
                f"{self.origin.mark(event.start_mark)}: the anchor &{name} is defined again "
                f"(first at line {first.line + 1}); give each anchor its own name"
            )
        if node is not None:
            self.anchors[name] = (node, size, height)

    def _anchor_open(self, done: _Open, height: int) -> None:
        if done.anchor is not None:
            self.anchors[done.anchor] = (done.node, self.values - done.start, height)

    def _alias(self, event: yaml.AliasEvent) -> None:
        name = event.anchor
        if name not in self.anchors:
            inside = next((o for o in self.stack if o.anchor == name), None)
            if inside is not None:
                raise ConfigError(
                    f"{self.origin.mark(event.start_mark)}: the alias *{name} is inside its own "
                    f"anchor &{name} (line {inside.node.start_mark.line + 1}), so the value "
                    "would contain itself forever. Refer only to an anchor defined before, "
                    "outside this value."
                )
            raise ConfigError(
                f"{self.origin.mark(event.start_mark)}: the alias *{name} has no anchor "
                f"&{name} before it; define the anchor first (aliases only refer backwards)"
            )
        node, size, height = self.anchors[name]
        self._count(size, event)
        self._depth(len(self.stack) + height, event)
        self._attach(node, height)

    def _attach(self, node: yaml.Node, height: int) -> None:
        if not self.stack:
            self.root = node
            return
        parent = self.stack[-1]
        parent.height = max(parent.height, height)
        if isinstance(parent.node, yaml.SequenceNode):
            parent.node.value.append(node)
        elif parent.key is None:
            parent.key = node
        else:
            parent.node.value.append((parent.key, node))
            parent.key = None


class _Builder:
    """Python values from composed nodes, recording in `src` where each one was written."""

    def __init__(self, origin: Origin, src: Source) -> None:
        self.origin, self.src = origin, src
        self.constructor = yaml.constructor.SafeConstructor()

    def _at(self, node: yaml.Node) -> str:
        return self.origin.at(*_mark(node))

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        self.src.values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            self._plain(node, _MAP, path)
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            self._plain(node, _SEQ, path)
            return [self.build(v, path + (i,)) for i, v in enumerate(node.value)]
        return self._scalar(node, path)

    def _plain(self, node: yaml.Node, tag: str, path: FieldPath) -> None:
        if node.tag != tag:
            raise ConfigError(
                f"{self._at(node)}: {dotted(path)}: the tag {printable(node.tag)!r} is not "
                "allowed; only plain YAML values are accepted (remove the tag)"
            )

    def _scalar(self, node: yaml.ScalarNode, path: FieldPath) -> Any:
        if node.tag in (_MERGE, _VALUE):
            return node.value  # `<<` or `=` written as a value: plain text, as quoted
        if node.tag not in _SCALAR_TAGS:
            self._plain(node, "", path)
        if node.tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise ConfigError(
                f"{self._at(node)}: {dotted(path)}: a number {len(node.value):,} characters long "
                f"({printable(node.value[:20])}...); numbers have at most {MAX_NUMBER_CHARS}. "
                "Check for a typo, or quote it if it is meant as text."
            )
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ValueError, OverflowError, TypeError, KeyError, IndexError, AttributeError) as e:
            # PyYAML's scalar constructors raise these for what its resolver let through or a
            # tag forced: `!!int abc`, `!!bool maybe`, `0x_`, the date 2001-13-45.
            kind = node.tag.rsplit(":", 1)[-1]
            # A ValueError says what is wrong (month must be in 1..12); the others are internals.
            why = f" ({printable(str(e), limit=80)})" if isinstance(e, ValueError) else ""
            raise ConfigError(
                f"{self._at(node)}: {dotted(path)}: {printable(node.value, limit=60)!r} is not a "
                f"valid {kind}{why}. Fix the value, or quote it if it is meant as text."
            ) from None

    def _mapping(self, node: yaml.MappingNode, path: FieldPath) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}  # from `<<: *anchor`; explicit keys override them
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE:
                merged.update(self._merge(value_node, path))
                continue
            key = self._key(key_node, path)
            if key in out:
                line, _ = self.src.keys[path + (key,)]
                raise ConfigError(
                    f"{self._at(key_node)}: {dotted(path + (key,))}: duplicate key "
                    f"(first given at line {line}); keep one of them"
                )
            self.src.keys[path + (key,)] = _mark(key_node)
            out[key] = self.build(value_node, path + (key,))
        self.src.values[path] = _mark(node)  # building merged anchors wrote theirs here
        return {**merged, **out}

    def _merge(self, node: yaml.Node, path: FieldPath) -> dict[Any, Any]:
        """The keys a YAML merge (`<<: *a` or `<<: [*a, *b]`) brings; the first listed wins."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not all(isinstance(s, yaml.MappingNode) for s in sources):
            raise ConfigError(
                f"{self._at(node)}: {dotted(path)}: '<<' (merge) takes a mapping or a list of "
                "mappings, e.g. <<: *defaults"
            )
        out: dict[Any, Any] = {}
        for source in reversed(sources):
            out.update(self.build(source, path))
        return out

    def _key(self, node: yaml.Node, path: FieldPath) -> Any:
        key = self._scalar(node, path) if isinstance(node, yaml.ScalarNode) else None
        if key is None or not isinstance(key, str | int | float):
            raise ConfigError(
                f"{self._at(node)}: {dotted(path)}: mapping keys must be plain names "
                "(a list, mapping, null or date is not a key)"
            )
        return key


def read_yaml(text: str, origin: Origin, src: Source, path: FieldPath = ()) -> Any:
    """The value of one YAML document (None when empty), positions recorded in `src`.

    Args:
        path: the field the document is the value of (a `--set` key), for error messages.

    Raises:
        ConfigError: located at the offending character, node or alias.
    """
    _check_text(text, origin)
    try:
        node = _Composer(origin).compose(text)
        return None if node is None else _Builder(origin, src).build(node, path)
    except yaml.MarkedYAMLError as e:
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        if "nesting depth" in problem:
            # libyaml scans a run of brackets ahead and stops at its own limit (1000) first.
            problem = f"lists and mappings are nested more than {MAX_DEPTH} deep"
        raise ConfigError(
            f"{origin.mark(e.problem_mark or e.context_mark)}: YAML error: {problem}. Fix the "
            "syntax (only plain YAML is accepted: no Python tags)."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin.name}: YAML error: {printable(str(e))}") from None
    except RecursionError:
        # Not expected (the composer bounds the depth), but a stack overflow is still bad input.
        raise ConfigError(
            f"{origin.name}: the YAML is nested too deeply to read; a config needs a few levels"
        ) from None


def decode(raw: bytes, path: str) -> str:
    """The file's text (UTF-8, an optional byte-order mark dropped), or a located error."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        col = len(raw[line_start : e.start].decode("utf-8", "replace")) + 1
        raise ConfigError(
            f"{path}:{line}:{col}: the file is not UTF-8 text (byte 0x{raw[e.start]:02x} "
            f"{e.reason}). Save it as UTF-8."
        ) from None
