"""Resuming a run: which config changes a checkpoint allows, and tidying the run's metric log.

A resumed run must end exactly where an uninterrupted one would. Changes that leave the saved
state and the data order meaning the same (more epochs, logging and evaluation cadence, where
data is cached, checkpoint settings, device count) are allowed and reported; anything else
(model, optimizer, schedule, data set, batch size, seed, ...) is refused with the list of fields
that differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelctl import data
from accelctl.checkpoint import IncompatibleCheckpoint
from accelctl.config import Config

ALLOWED_CHANGES = (
    "train.epochs",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.on_nan",
    "checkpoint",
    "output",
    "data.prefetch",
    "data.cache",
    "data.read_threads",
    "data.data_dir",
    "parallel.num_devices",
    "parallel.strategy",
    "parallel.mesh",
    # How the same model is computed or where a fresh run took its weights from: neither
    # changes the saved state's meaning (init_from is ignored when resuming).
    "model.remat",
    "model.attention",
    "model.init_from",
)
_ABSENT = object()


def _show(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Compare two resolved configs (`Config.to_dict()`).

    Returns:
        (allowed, refused): "field: old -> new" lines, sorted by field.
    """
    old, new = _flatten(saved), _flatten(current)
    allowed, refused = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            (allowed if _allowed(key) else refused).append(f"{key}: {_show(a)} -> {_show(b)}")
    return allowed, refused


def check_resumable(
    cfg: Config, steps_per_epoch: int, meta: dict[str, Any], path: Path
) -> list[str]:
    """Raise IncompatibleCheckpoint unless `cfg` may continue the checkpoint at `path`.

    Returns:
        The allowed changes ("field: old -> new"), to be reported.
    """
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise IncompatibleCheckpoint(f"checkpoint {path} records no config; it cannot be resumed")
    allowed, refused = config_changes(saved, cfg.to_dict())
    if refused:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was written with a different config; these fields differ "
            f"(checkpoint -> now): {'; '.join(refused)}. They change the model, the optimizer "
            "or the data order the saved state belongs to: resume with the run's own config.yaml "
            "(changing only epochs/steps, logging, evaluation, caching or checkpoint settings), "
            "or start a new run."
        )
    try:
        data.DataPosition.from_dict(meta.get("data_position", {}), steps_per_epoch=steps_per_epoch)
    except Exception as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: {e}") from None
    return allowed


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric events after `step` (and torn or damaged lines) from a metrics.jsonl,
    atomically.

    The resumed run logs those steps again, identically, so nothing is lost. A metrics.jsonl
    that is not a file of text lines (a folder, binary garbage) is moved aside to
    `metrics.jsonl.damaged-<time>` and the log starts again: a damaged log never stops a resume.

    Returns:
        The number of lines dropped.
    """
    if not path.exists() and not path.is_symlink():
        return 0
    if not path.is_file():
        _move_aside(path)
        return 0
    kept, dropped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            event = json.loads(line)
            late = isinstance(event, dict) and int(event.get("step", 0)) > step
        except (UnicodeDecodeError, ValueError, TypeError, OverflowError):
            dropped += 1  # torn write of a killed process, or damaged bytes
            continue
        if late or not isinstance(event, dict):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _move_aside(path: Path) -> Path:
    import datetime as dt

    target = path.with_name(f"{path.name}.damaged-{dt.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(path, target)
    return target
