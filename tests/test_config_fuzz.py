"""Property-based fuzzing of config loading (hypothesis).

Every shipped config is mutated (values of other types, out-of-range and boundary numbers,
unknown names, dropped / duplicated / renamed keys, values wrapped in lists or maps, raw
character and byte edits) and loaded with random `--set` overrides. Whatever the input, loading
must give a valid Config (which then round-trips through its resolved YAML) or a ConfigError that
names where the problem is (the file, or the `--set` item), quickly; any other exception is a bug.

Runs 100 examples per test by default (seconds); ACCELCTL_FUZZ_EXAMPLES=3000 runs it
long. With CI=true the examples are derandomized, so a CI failure reproduces exactly; hypothesis
prints the falsifying example (and a @reproduce_failure blob) either way.
"""

from __future__ import annotations

import os
import re
import string
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from accelctl.config import Config, ConfigError, load, load_text

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "configs").glob("*.yaml"))}
FILENAME = "fuzz.yaml"
TIME_LIMIT_S = 2.0

FUZZ = settings(
    max_examples=int(os.environ.get("ACCELCTL_FUZZ_EXAMPLES", "100")),
    derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
    deadline=None,  # the time bound is asserted per example below, with the input in the message
    database=None,  # no .hypothesis/ folder in the checkout; failures print their example
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field name of the schema (all model and data variants)."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        out.append(path)
        for member in _models_in(info.annotation):
            out.extend(_field_paths(member, f"{path}."))
    return sorted(set(out))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


FIELDS = _field_paths(Config)
WORDS = sorted({w for text in SHIPPED.values() for w in re.findall(r"[a-z_][a-z0-9_]*", text)})

# Numbers at and around every range boundary the schema has, and past what Python/numpy/JAX take.
BOUNDARY_INTS = [
    0, 1, 2, -1, -2, 64, 255, 256, 1023, 1024, 1025,
    2**20, 2**20 + 1, 2**24, 2**24 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**100,
]  # fmt: skip
SPECIAL_FLOATS = [
    0.0, -0.0, 0.5, 1.0, 1.5, -0.5, 1e-300, 5e-324, 1e300, 1.8e308, 2.0**64,
    float("inf"), float("-inf"), float("nan"),
]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(BOUNDARY_INTS),
    st.integers(),
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(),
    st.booleans(),
    st.none(),
    st.sampled_from(WORDS),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# Raw text that stresses the YAML layer: syntax characters, escapes, control characters.
YAML_CHARS = string.printable + "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\x9b\xa0\u2028\ufeff\ufffe"
yaml_snippets = st.one_of(
    st.text(alphabet=YAML_CHARS, max_size=12),
    st.sampled_from(
        [
            "[",
            "]",
            "{",
            "}",
            ": ",
            "- ",
            "&a ",
            "*a",
            "<<: *a",
            "!!int ",
            "!!python/name:os.system",
            "? ",
            "---\n",
            "...\n",
            "%YAML 1.1\n",
            '"\\0"',
            "'",
            '"',
            "|\n",
            ">\n",
            "\t",
            "\n  ",
            "0x_",
            "1:2:3",
            "2001-13-45",
            ".inf",
            ".nan",
            "9" * 5000,
            "[" * 300,
            "{a: " * 200,
        ]
    ),  # fmt: skip
)


def _check(call: typing.Callable[[], Config], where: str, described: str) -> None:
    """`call()` gives a valid Config or a located ConfigError, within the time bound."""
    start = time.perf_counter()
    try:
        cfg = call()
    except ConfigError as e:
        msg = str(e)
        assert msg.strip(), described
        # Printed as is by the CLI: no control characters, nothing a terminal would act on.
        assert all(ch.isprintable() or ch == "\n" for ch in msg), f"{described}\n-> {msg!r}"
        assert where in msg or "--set " in msg, f"{described}\n-> unlocated error: {msg}"
    else:
        assert isinstance(cfg, Config), described
        again = load_text(cfg.to_yaml(), "resolved.yaml")
        assert again.model_dump() == cfg.model_dump(), f"{described}\n-> no round trip"
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{described}\n-> took {elapsed:.2f} s"


# ----------------------------------------------------------------------- structural mutations
def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


@st.composite
def mutated_trees(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    tree = yaml.safe_load(SHIPPED[name])
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(tree)))
        if not path:
            continue
        parent, last = _get(tree, path[:-1]), path[-1]
        old = parent[last]
        kind = draw(st.sampled_from(["value", "drop", "rename", "wrap_list", "wrap_map", "add"]))
        if kind == "value":
            parent[last] = draw(values)
        elif kind == "drop":
            del parent[last]
        elif kind == "rename" and isinstance(parent, dict):
            new = draw(st.sampled_from(WORDS) | st.text(max_size=10))
            parent[new] = parent.pop(last)
        elif kind == "wrap_list":
            parent[last] = [old] * draw(st.integers(0, 3))
        elif kind == "wrap_map":
            parent[last] = {draw(st.sampled_from(WORDS)): old}
        elif kind == "add" and isinstance(old, dict):
            old[draw(st.sampled_from(WORDS) | st.text(max_size=10))] = draw(values)
    return name, tree


@FUZZ
@given(mutated_trees())
def test_structurally_mutated_configs(named_tree):
    name, tree = named_tree
    try:
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a surrogate in a drawn string: not a YAML text at all
        return
    _check(lambda: load_text(text, FILENAME), FILENAME, f"{name} as:\n{text}")


# ----------------------------------------------------------------------------- text mutations
@st.composite
def mutated_texts(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    text = SHIPPED[name]
    for _ in range(draw(st.integers(1, 5))):
        lines = text.splitlines(keepends=True)
        kind = draw(
            st.sampled_from(
                ["insert", "delete", "replace", "dup_line", "drop_line", "indent", "alias"]
            )
        )
        pos = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:pos] + draw(yaml_snippets) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 40)) :]
        elif kind == "replace":
            # A value swapped for another: numbers at the boundaries, names, odd scalars.
            token = draw(
                st.sampled_from([str(i) for i in BOUNDARY_INTS])
                | st.sampled_from([".inf", "-.inf", ".nan", "1e400", "-0.0", "null", "[]", "{}"])
                | st.sampled_from(WORDS)
            )
            text = re.sub(r"(?<=: )[^\s#,\]}]+", token, text, count=1 + pos % 40)
        elif kind == "alias":
            # Anchor one value and use it again elsewhere (maybe inside itself, maybe merged).
            spots = [m.end() for m in re.finditer(r"(?<=: )|(?<=- )", text)]
            if spots:
                first, second = sorted(draw(st.sampled_from(spots)) for _ in range(2))
                use = draw(st.sampled_from(["*x", "[*x, *x]", "{<<: *x}", "[[*x]]"]))
                text = text[:first] + "&x " + text[first:second] + use + " " + text[second:]
        elif lines and kind == "dup_line":
            i = pos % len(lines)
            lines.insert(i, lines[i])  # a duplicated key, or a repeated list item
            text = "".join(lines)
        elif lines and kind == "drop_line":
            del lines[pos % len(lines)]
            text = "".join(lines)
        elif lines and kind == "indent":
            i = pos % len(lines)
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", ""])) + lines[i].lstrip(" ")
            text = "".join(lines)
    return name, text


@FUZZ
@given(mutated_texts())
def test_text_mutated_configs(named_text):
    name, text = named_text
    _check(lambda: load_text(text, FILENAME), FILENAME, f"{name} as:\n{text!r}")


# ---------------------------------------------------------------------------------- overrides
set_values = st.one_of(
    st.sampled_from([str(i) for i in BOUNDARY_INTS]),
    st.sampled_from([".inf", ".nan", "-1", "0", "null", "[]", "{}", "", "abc", "[1, 2]"]),
    st.sampled_from(WORDS),
    yaml_snippets,
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
set_keys = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS).map(lambda f: f + ".x"),
    st.text(alphabet=string.ascii_lowercase + "._-= \x00", max_size=20),
)


@FUZZ
@given(
    st.sampled_from(sorted(SHIPPED)),
    st.lists(st.tuples(set_keys, set_values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4),
)
def test_random_set_overrides(name, items):
    _check(lambda: load_text(SHIPPED[name], FILENAME, items), FILENAME, f"{name} --set {items!r}")


# ---------------------------------------------------------------------------- files as bytes
@FUZZ
@given(
    st.sampled_from(sorted(SHIPPED)),
    st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=0, max_size=4)), max_size=4),
    st.integers(0, 20),
)
def test_byte_mutated_files(name, edits, cut):
    raw = bytearray(SHIPPED[name].encode())
    for pos, data in edits:  # insert raw bytes (invalid UTF-8 too), deleting as many
        pos %= len(raw) + 1
        raw[pos : pos + len(data)] = data
    if cut:
        del raw[-cut:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FILENAME
        path.write_bytes(bytes(raw))
        _check(lambda: load(path), FILENAME, f"{name} as bytes {bytes(raw)!r}")


def test_shipped_configs_are_fuzzed():
    assert len(SHIPPED) >= 5 and "train.seed" in FIELDS and "data.vocab_size" in FIELDS
