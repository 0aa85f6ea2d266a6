"""JAX's persistent compilation cache, on by default for every accelctl command.

A second run of the same program (same config, shapes, devices, jax version) loads its compiled
executables from disk instead of compiling them again. The minimum compile time and entry size
are 0 so that small programs are cached too. `ACCELCTL_COMPILE_CACHE` names the folder (default
`~/.cache/accelctl/jax`) or turns the cache off with `off`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ACCELCTL_COMPILE_CACHE"


def default_dir() -> Path | None:
    """The cache folder accelctl uses, or None when `ACCELCTL_COMPILE_CACHE=off`."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "accelctl" / "jax"


def enable(directory: Path | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `directory` (default: `default_dir()`).

    Later compilations use the new folder (also after earlier ones in this process). Returns
    the folder in use, or None when the cache is off.
    """
    import jax

    directory = directory or default_dir()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    from jax.experimental.compilation_cache import compilation_cache as cc

    # JAX opens its cache once per process; a new folder needs that cache dropped first.
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
