"""Importing what a config names by import path: `package.module:Name` (importable) or
`/abs/path/file.py:Name` (a file, imported by its path under a unique module name, never via
sys.path), for the user's model, data loader and loss alike; and describing a user's exception
in one line (type, message, the user's own file:line) instead of a traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from accelctl.errors import FieldError

# File targets imported by path, by resolved path: each file is executed once per process.
_FILE_MODULES: dict[str, ModuleType] = {}
_FILE_LOCK = threading.RLock()  # re-entrant: a user's file may import another by path


def import_target(target: str, field: tuple[str, ...]) -> Any:
    """Import `package.module:Name` or `/abs/path/file.py:Name` and return the object Name.

    Args:
        target: the validated import path (file paths are already absolute). Name may be dotted
            (`Outer.Inner`).
        field: the config field the target came from, for the errors.
    Returns:
        The object.
    Raises:
        FieldError(field): the module or file does not exist or fails to import, or it has no
            such name (with the closest names it does have).
    """
    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name), field)
    else:
        module = _import_module(module_name, field)
    obj: Any = module
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            shown = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
            raise FieldError(
                field,
                f"{where} has no name {part!r}{hint} (it defines: {shown or 'nothing public'})",
            )
        obj = getattr(obj, part)
        where = f"{where}:{part}" if where == module_name else f"{where}.{part}"
    return obj


def _import_module(name: str, field: tuple[str, ...]) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only a missing target (or one of its parent packages) is "not found"; a module that
        # is found but imports something missing is reported as its own failure below.
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise FieldError(field, f"importing {name} failed: {describe_error(e)}") from None
        raise FieldError(field, _not_found(name, e.name)) from None
    except Exception as e:  # the user's module raised while being imported
        raise FieldError(field, f"importing {name} failed: {describe_error(e)}") from None


def _not_found(name: str, missing: str) -> str:
    home = str(Path.home())
    paths = [p or "." for p in sys.path]
    shown = [p.replace(home, "~", 1) if p.startswith(home) else p for p in paths[:4]]
    more = f" and {len(paths) - 4} more" if len(paths) > 4 else ""
    local = Path.cwd() / Path(*missing.split("."))
    hint = ""
    if local.is_dir() or local.with_suffix(".py").is_file():
        hint = (
            f" ({local.relative_to(Path.cwd())} is in the current folder, which the `accelctl` "
            "command does not search)"
        )
    return (
        f"no module named {missing!r} on the Python path{hint}; searched {', '.join(shown)}{more}. "
        f"Put its folder on PYTHONPATH (PYTHONPATH=/path/to/project accelctl ...), install it "
        f"(pip install -e .), or name the file instead: path/to/{name.rsplit('.', 1)[-1]}.py:Name "
        "(relative to the config file's folder)"
    )


def _import_file(path: Path, field: tuple[str, ...]) -> ModuleType:
    key = str(path)
    with _FILE_LOCK:
        if key in _FILE_MODULES:
            return _FILE_MODULES[key]
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise FieldError(
                field,
                f"{path} {what}; fix the path (relative paths are taken from "
                "the config file's folder)",
            )
        # A unique name per file: two nets.py in different folders never collide, and the user's
        # file never shadows (or is shadowed by) an installed module of the same name.
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        name = f"accelctl_user.{_identifier(path.stem)}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FieldError(field, f"{path} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        # In sys.modules while it executes: dataclasses, pickling and typing look it up there.
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise FieldError(
                field, f"importing {path} failed: {describe_error(e)}{_sibling_hint(e, path)}"
            ) from None
        _FILE_MODULES[key] = module
        return module


def _sibling_hint(e: Exception, path: Path) -> str:
    """Why `import layers` fails in a nets.py imported by path when layers.py sits beside it."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return ""
    top = path.parent / e.name.split(".")[0]
    if not (top.is_dir() or top.with_suffix(".py").is_file()):
        return ""
    return (
        f". {top.name} sits next to {path.name}, but a file target is imported by its path and "
        f"its folder is not searched for imports: set PYTHONPATH={path.parent}, or keep the "
        "model in one file"
    )


def _identifier(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)
    return out if out and not out[0].isdigit() else f"m_{out}"


def describe_error(e: BaseException, *, lines: int = 4) -> str:
    """`Type: message` (its first lines) and where in the user's code it was raised.

    The innermost frame outside Python's and the installed packages' folders (and accelctl's) is
    the user's line: shown as `(at nets.py:12, in __init__)`, so no traceback is needed.
    """
    text = str(e).strip().splitlines()
    head = "\n".join(text[:lines]) + ("\n..." if len(text) > lines else "")
    out = f"{type(e).__name__}: {head}" if head else type(e).__name__
    library = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    library.add(os.path.realpath(Path(__file__).parent))  # accelctl itself
    user = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if not any(os.path.realpath(f.filename).startswith(p + os.sep) for p in library)
        and not f.filename.startswith("<")
    ]
    if user:
        f = user[-1]
        out += f" (at {f.filename}:{f.lineno}, in {f.name})"
    return out
