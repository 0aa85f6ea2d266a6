"""How accelctl was installed, so install hints fit it: an editable checkout, a local wheel or
folder, or a package index (PEP 610's `direct_url.json` says which)."""

from __future__ import annotations

import json
from importlib import metadata
from urllib.parse import unquote, urlparse


def install_source() -> tuple[str, str | None]:
    """("editable", folder) | ("local", path of the wheel or folder) | ("index", None)."""
    # A checkout's own accelctl.egg-info can shadow the installed record (it has no
    # direct_url.json): look at every record of accelctl on the path.
    records = metadata.distributions(name="accelctl")
    raw = next((t for d in records if (t := d.read_text("direct_url.json"))), None)
    if not raw:
        return "index", None
    try:
        info = json.loads(raw)
    except ValueError:
        return "index", None
    url = urlparse(info.get("url", ""))
    path = unquote(url.path) if url.scheme == "file" else None
    if info.get("dir_info", {}).get("editable"):
        return "editable", path
    return ("local", path) if path else ("index", None)


def pip_install_hint(extra: str) -> str:
    """The command that adds an extra (e.g. "tfds", "cuda13") to this installation."""
    kind, path = install_source()
    if kind == "editable" and path:
        return f'pip install -e "{path}[{extra}]"'
    if kind == "local" and path:
        return f'pip install "{path}[{extra}]"'
    return f'pip install "accelctl[{extra}]"'
