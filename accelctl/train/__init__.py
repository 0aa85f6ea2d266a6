"""Training: state, pure steps, setup, and the host loop; `train()` runs a whole job."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from accelctl.config import Config
from accelctl.errors import UserError
from accelctl.metrics import JsonlWriter, MetricWriter, MultiWriter, NullWriter, ProgressWriter

_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json")


def default_run_dir(cfg: Config, config_name: str) -> Path:
    """`<output.root>/<name>-<timestamp>/` with name = output.name or the config file's stem."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.output.name or config_name}-{stamp}"


def _check_run_dir(run_dir: Path) -> None:
    existing = [name for name in _OUTPUTS if (run_dir / name).exists()]
    if existing:
        raise UserError(
            f"--run-dir {run_dir} already holds a run ({', '.join(existing)}); nothing was "
            "overwritten. Choose a new --run-dir or leave it out for a fresh timestamped one."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory; choose another path")


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: cannot create the run directory ({e})") from None


def train(
    cfg: Config, *, run_dir: Path, quiet: bool = False, description: str = "train"
) -> dict[str, Any]:
    """Run a whole training job and write its run directory.

    Args:
        cfg: validated config.
        run_dir: where config.yaml, metrics.jsonl and summary.json go (must not hold a run).
        quiet: no progress output.
        description: progress-bar label.
    Returns:
        The summary (also written to run_dir/summary.json).
    """
    import jax

    from accelctl.train.loop import run
    from accelctl.train.setup import make_setup

    _check_run_dir(run_dir)
    setup = make_setup(cfg)  # config/data errors surface before anything is written
    is_main = jax.process_index() == 0
    writers: list[MetricWriter] = []
    if is_main:
        _make_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        writers.append(JsonlWriter(run_dir / "metrics.jsonl"))
        if not quiet:
            writers.append(ProgressWriter())
    writer = MultiWriter(writers) if writers else NullWriter()
    summary = run(setup, writer, description=description)
    summary["run_dir"] = str(run_dir)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
