"""Orbax checkpoints of the whole train state: save on a cadence, restore the newest good one.

Layout: `<run dir>/checkpoints/<step>/{state, meta}`. `state` is the TrainState pytree
(parameters, model and optimizer state incl. schedule/plateau state, step, RNG key, metric sums),
`meta` is JSON: the resolved config, the data position, the eval metrics of that step, versions.

Orbax writes each step into a `<step>.orbax-checkpoint-tmp...` folder and renames it when the
write is complete, so a folder named by its step number alone is complete. A leftover temporary
folder is a checkpoint the process died writing: it is reported and never read. A complete
folder that cannot be read (truncated or corrupted files) is skipped for the previous one, and
the caller is told why.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from accelctl.config import CheckpointConfig
from accelctl.errors import UserError
from accelctl.fingerprints import fingerprints, path_str

CHECKPOINT_DIR = "checkpoints"
_TMP_MARK = ".orbax-checkpoint-tmp"


@dataclass
class Restored:
    """A restored checkpoint: its step, state, metadata, folder, and what was skipped on the way."""

    step: int
    state: Any
    meta: dict[str, Any]
    path: Path
    notes: list[str] = field(default_factory=list)


class IncompatibleCheckpoint(UserError):
    """The checkpoint was written by a run this config cannot continue (model, optimizer, ...)."""


def _quiet_closed_loop(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap `sys.unraisablehook` to drop the "Event loop is closed" noise of a failed restore.

    When a restore fails on a damaged file, tensorstore still completes the other reads and
    hands them to orbax's asyncio loop, which is closed by then; each one is reported from a C++
    thread as an unraisable RuntimeError with a traceback. The failure itself is reported (and
    handled) by `restore`; every other unraisable error still reaches `previous`.
    """

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook.accelctl_quiet = True  # type: ignore[attr-defined]
    return hook


def _ocp() -> Any:
    import orbax.checkpoint as ocp

    # Orbax logs every save and restore through absl, and a failed background write as an
    # ERROR with its traceback from each of its threads; accelctl reports failures itself, once.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    # ... and asyncio reports each of its failed futures again ("exception never retrieved").
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "accelctl_quiet", False):
        sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    return ocp


def _manager(
    directory: Path, cfg: CheckpointConfig | None, *, partial: bool = False, partial_bytes: int = 0
) -> Any:
    """A CheckpointManager over `directory`; read-only when `cfg` is None.

    `partial`: read the state with the PyTree handler, which can restore a subtree alone (the
    standard handler writes the same format but restores whole trees only); `partial_bytes` is
    the largest array it will read.
    """
    ocp = _ocp()
    cm = ocp.checkpoint_managers
    if partial:
        # Reads staged in host memory at once: the largest array, or 64 MB of smaller ones.
        # A partial restore serves evaluation and export, where host memory is the point
        # (orbax's default stages everything at once: a second copy of the model).
        staged = (max(partial_bytes, 64 << 20) + (1 << 20)) / 1e9  # + 1 MB: GB float rounding
        state_handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=staged)
    else:
        state_handler = ocp.StandardCheckpointHandler()
    handlers = {"state": state_handler, "meta": ocp.JsonCheckpointHandler()}
    if cfg is None:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        policies = [cm.LatestN(n=cfg.keep)]
        best: dict[str, Any] = {}
        if cfg.keep_best is not None:
            metric, best_is_max = cfg.keep_best.metric, cfg.keep_best.best_is_max
            policies.append(
                cm.BestN(
                    get_metric_fn=lambda m: m[metric],
                    # BestN keeps the last n after sorting: ascending keeps the largest.
                    reverse=not best_is_max,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
            # best_fn makes orbax write each checkpoint's metrics to disk, so a resumed run's
            # manager still ranks (and keeps) the best checkpoint of before the interruption.
            best = {"best_fn": lambda m: m[metric], "best_mode": "max" if best_is_max else "min"}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_,
            preservation_policy=cm.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            create=True,
            **best,
        )
    return ocp.CheckpointManager(directory.absolute(), item_handlers=handlers, options=options)


def incomplete_checkpoints(directory: Path) -> list[Path]:
    """Folders of checkpoints that were being written when their process stopped."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _TMP_MARK in p.name)


def complete_steps(directory: Path) -> list[int]:
    """Steps with a complete checkpoint folder in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _verify(restored: Any, meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first array whose bits differ from what was saved."""
    saved = meta.get("fingerprints")
    if not isinstance(saved, dict):
        return  # written before fingerprints existed: nothing to compare
    for path, words in fingerprints(restored).items():
        if path in saved and saved[path] != words:
            raise ValueError(f"the data of {path} differs from what was saved (checksum)")


def _rank_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
    return {"eval_loss": eval_metrics["loss"], "eval_accuracy": eval_metrics["accuracy"]}


class Checkpointer:
    """Saves the train state on the configured cadence (and on request) under one directory.

    Args:
        directory: `<run dir>/checkpoints`.
        cfg: the `checkpoint` section.
        steps_per_epoch: for `every_epochs`.
        total_steps: the final step is always saved.
    """

    def __init__(
        self, directory: Path, cfg: CheckpointConfig, *, steps_per_epoch: int, total_steps: int
    ) -> None:
        self.directory = directory
        self._cfg = cfg
        self._spe, self._total = steps_per_epoch, total_steps
        self._mngr = _manager(directory, cfg)
        self.last_saved: int | None = None
        self.best: dict[str, Any] | None = None
        if cfg.keep_best is not None:  # a resumed run: the best may be an earlier checkpoint
            for step in complete_steps(directory):
                try:
                    evals = _read_meta(self._mngr, step).get("eval")
                except Exception:  # noqa: BLE001 - an unreadable one is not a candidate
                    continue
                if evals:
                    self._track_best(step, _rank_metrics(evals))

    def due(self, step: int) -> bool:
        """Whether `step` (updates done) is a checkpoint step of the cadence, or the last one."""
        c = self._cfg
        return (
            step == self._total
            or (c.every_steps is not None and step % c.every_steps == 0)
            or (c.every_epochs is not None and step % (c.every_epochs * self._spe) == 0)
        )

    def path_of(self, step: int) -> Path:
        return self.directory / str(step)

    def save(
        self, step: int, state: Any, meta: dict[str, Any], *, eval_metrics: dict | None = None
    ) -> Path:
        """Write `state` and `meta` as checkpoint `step` (in the background when async).

        Returns once the state has been copied off the devices, so the caller may donate it.
        `eval_metrics` ({"loss", "accuracy"} of an evaluation at this step) rank keep_best.
        """
        ocp = _ocp()
        metrics = None
        if eval_metrics is not None:
            metrics = _rank_metrics(eval_metrics)
            self._track_best(step, metrics)
        meta = {**meta, "fingerprints": fingerprints(state)}
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        self.last_saved = step
        return self.path_of(step)

    def _track_best(self, step: int, metrics: dict[str, float]) -> None:
        kb = self._cfg.keep_best
        if kb is None:
            return
        value = metrics[kb.metric]
        # Ties go to the newer checkpoint, as orbax's BestN keeps it (stable sort, keeps last).
        better = self.best is None or (
            value >= self.best["value"] if kb.best_is_max else value <= self.best["value"]
        )
        if better:
            self.best = {
                "step": step,
                "metric": kb.metric,
                "value": value,
                "path": str(self.path_of(step)),
            }

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release the manager's threads."""
        self._mngr.wait_until_finished()
        self._mngr.close()


def _shape(leaf: Any) -> tuple[int, ...]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # Orbax stores a typed PRNG key as its key data: one more trailing axis.
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(getattr(leaf, "shape", ()))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): _shape(leaf) for p, leaf in flat}


def _nbytes(leaf: Any) -> int:
    size = 1
    for d in getattr(leaf, "shape", ()):
        size *= int(d)
    return size * getattr(getattr(leaf, "dtype", None), "itemsize", 4)


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not hold what its own metadata says was saved."""


def _check_structure(saved: Any, abstract_state: Any, where: Path, *, partial: bool) -> None:
    """Raise DamagedCheckpoint listing arrays that are missing, extra or of another shape (with
    `partial`, arrays the target does not ask for are not "extra").

    Called after the checkpoint's recorded config was found compatible, so the same structure
    is expected: a difference means missing or foreign files, and restore falls back.
    """
    have, want = _shapes(saved), _shapes(abstract_state)
    if partial:
        have = {k: v for k, v in have.items() if k.split(".", 1)[0] in abstract_state}
    diffs = [
        f"{k}: checkpoint {have[k]} vs config {want[k]}"
        for k in sorted(have.keys() & want.keys())
        if have[k] != want[k]
    ]
    diffs += [f"{k}: only in the checkpoint" for k in sorted(have.keys() - want.keys())]
    diffs += [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - have.keys())]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
        raise DamagedCheckpoint(f"its arrays do not fit the state its config builds: {shown}")


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _read_meta(mngr: Any, step: int) -> dict[str, Any]:
    ocp = _ocp()
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError("its meta item is not a JSON object with the run's config")
    return meta


def read_meta(directory: Path, step: int | None = None) -> dict[str, Any]:
    """The metadata (config, data position, eval metrics) of checkpoint `step` or of the newest
    one whose metadata is readable.

    Raises:
        UserError: no complete checkpoint with readable metadata.
    """
    steps = [step] if step is not None else list(reversed(complete_steps(directory)))
    errors = []
    mngr = _manager(directory, None)
    try:
        for s in steps:
            try:
                return _read_meta(mngr, s)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{directory / str(s)}: {_why(e)}")
    finally:
        mngr.close()
    raise UserError(
        f"no checkpoint with readable metadata in {directory}"
        + (f" ({'; '.join(errors)})" if errors else "")
    )


def restore(
    directory: Path,
    abstract_state: Any,
    *,
    step: int | None = None,
    check_meta_fn: Callable[[dict[str, Any], Path], None] | None = None,
    partial: bool = False,
    move_aside: bool = False,
) -> Restored:
    """Restore the newest readable checkpoint in `directory` (or exactly `step`).

    Args:
        directory: a checkpoints folder.
        abstract_state: pytree of ShapeDtypeStructs with shardings: the restored arrays get them.
            With `partial`, a dict of some of the state's top-level fields (e.g. params and
            model_state): only those are read and allocated.
        step: restore this step only (no fallback).
        check_meta_fn: called with (meta, path) before the state is read; raises a UserError
            when the checkpoint must not be used (e.g. an incompatible config).
        move_aside: rename the damaged checkpoints newer than the one restored to
            `<step>.damaged-<time>` (kept for inspection): a resumed run that saves the same
            step again must not collide with them. Only a run that continues does this;
            evaluation never changes a checkpoints folder.
    Returns:
        Restored, with `notes` saying which checkpoints were skipped and why.
    Raises:
        UserError: no complete, readable checkpoint; IncompatibleCheckpoint.
    """
    ocp = _ocp()
    notes = [
        f"ignored {p}: a checkpoint that was still being written when its process stopped"
        for p in incomplete_checkpoints(directory)
    ]
    steps = complete_steps(directory)
    if step is not None:
        if step not in steps:
            raise UserError(
                f"{directory} has no complete checkpoint for step {step}; it has "
                f"{', '.join(map(str, steps)) or 'none'}"
            )
        steps = [step]
    if not steps:
        raise UserError(
            f"{directory} holds no complete checkpoint"
            + (" (only ones that were still being written)" if notes else "")
            + "; start a fresh run instead (leave out {resume})"
        )
    largest = max((_nbytes(x) for x in jax.tree.leaves(abstract_state)), default=0)
    mngr = _manager(directory, None, partial=partial, partial_bytes=largest)
    if partial:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state_args = ocp.args.PyTreeRestore(
            item=abstract_state, restore_args=restore_args, partial_restore=True
        )
    else:
        state_args = ocp.args.StandardRestore(abstract_state)
    damaged: list[Path] = []
    try:
        for s in reversed(steps):
            path = directory / str(s)
            try:
                meta = _read_meta(mngr, s)
                if check_meta_fn is not None:
                    check_meta_fn(meta, path)
                saved = mngr.item_metadata(s)["state"]
                _check_structure(saved, abstract_state, path, partial=partial)
                state = mngr.restore(s, args=ocp.args.Composite(state=state_args)).state
                _verify(state, meta)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                notes.append(f"skipped {path}: unreadable ({_why(e)})")
                damaged.append(path)
                continue
            if move_aside:
                notes += _move_aside(damaged)
            return Restored(step=s, state=state, meta=meta, path=path, notes=notes)
    finally:
        mngr.close()
    raise UserError(
        f"no readable checkpoint in {directory}: "
        + "; ".join(notes)
        + ". Delete the damaged folders or start a fresh run."
    )


def _move_aside(paths: list[Path]) -> list[str]:
    """Rename damaged checkpoint folders out of the way (process 0 only); notes saying where."""
    import datetime as dt

    if jax.process_index() != 0:
        return []
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    notes = []
    for path in paths:
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        try:
            path.rename(target)
        except OSError as e:
            notes.append(f"could not move {path} aside ({e.strerror or e})")
            continue
        notes.append(f"moved the damaged {path} aside to {target}")
    return notes


def find_checkpoint(path: Path) -> tuple[Path, int | None]:
    """Resolve what a user names as a checkpoint: a run directory, its checkpoints folder, or a
    step folder.

    Returns:
        (checkpoints folder, step or None for the newest).
    Raises:
        UserError: nothing checkpoint-like at `path`.
    """
    if not path.exists():
        steps = complete_steps(path.parent) if path.name.isdigit() else []
        have = f"; {path.parent} has steps {', '.join(map(str, steps))}" if steps else ""
        raise UserError(f"does not exist{have}", param="checkpoint", value=path)
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, None
    if path.is_dir() and path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    if path.is_dir() and (complete_steps(path) or incomplete_checkpoints(path)):
        return path, None
    raise UserError(
        "not a run directory, a checkpoints folder or a checkpoint step folder (expected "
        f"{path}/{CHECKPOINT_DIR}/<step>/ or {path}/<step>/state)",
        param="checkpoint",
        value=path,
    )
