"""Training: state, pure steps, setup, and the host loop; `train()` runs a whole job."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelctl.checkpoint import CHECKPOINT_DIR, complete_steps, incomplete_checkpoints
from accelctl.config import Config
from accelctl.errors import Preempted, UserError
from accelctl.metrics import (
    TENSORBOARD_DIR,
    JsonlWriter,
    MetricWriter,
    MultiWriter,
    NullWriter,
    ProgressWriter,
    TensorBoardWriter,
)

_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT_DIR)


def default_run_dir(cfg: Config, config_name: str) -> Path:
    """`<output.root>/<name>-<timestamp>/` with name = output.name or the config file's stem."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.output.name or config_name}-{stamp}"


def _check_run_dir(run_dir: Path) -> None:
    existing = [name for name in _OUTPUTS if (run_dir / name).exists()]
    if existing:
        raise UserError(
            f"--run-dir {run_dir} already holds a run ({', '.join(existing)}); nothing was "
            "overwritten. Continue it with --resume, choose a new --run-dir, or leave it out for "
            "a fresh timestamped one."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory; choose another path")


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run-dir {run_dir}: cannot create the run directory ({e})") from None


def _stderr(message: str) -> None:
    print(f"accelctl: {message}", file=sys.stderr, flush=True)


def _wants_resume(cfg: Config, run_dir: Path, resume: bool) -> bool:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    found = bool(complete_steps(ckpt_dir) or incomplete_checkpoints(ckpt_dir))
    if resume and not found:
        raise UserError(
            f"--resume: {run_dir} holds no checkpoint to continue ({ckpt_dir} is missing or "
            "empty); leave out --resume to start a fresh run there, or name the run directory "
            "that has them"
        )
    return resume or (cfg.checkpoint.resume == "auto" and found)


def train(
    cfg: Config,
    *,
    run_dir: Path,
    quiet: bool = False,
    description: str = "train",
    resume: bool = False,
    log_fn: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Run a whole training job (or continue one) and write its run directory.

    Args:
        cfg: validated config.
        run_dir: where config.yaml, metrics.jsonl, tensorboard/, summary.json and checkpoints/
            go. A fresh run needs it free of a previous run; a resumed one continues the run there.
        quiet: no progress output.
        description: progress-bar label.
        resume: continue from the newest good checkpoint in run_dir (also with
            `checkpoint.resume: auto` when one exists).
        log_fn: receives one-line notices (resume, fallbacks, allowed config changes).
    Returns:
        The summary (also written to run_dir/summary.json).
    Raises:
        UserError: bad input or an unusable checkpoint (exit 2); NonFiniteLoss (exit 3);
            Preempted after a signal, once the checkpoint is written (exit 75).
    """
    import jax

    from accelctl import checkpoint
    from accelctl.train.loop import run
    from accelctl.train.preempt import PreemptionGuard
    from accelctl.train.resume import check_resumable, truncate_metrics
    from accelctl.train.setup import make_setup

    resuming = _wants_resume(cfg, run_dir, resume)
    if not resuming:
        _check_run_dir(run_dir)
    setup = make_setup(cfg)  # config/data errors surface before anything is written
    is_main = jax.process_index() == 0
    ckpt_dir = run_dir / CHECKPOINT_DIR
    start, resume_event = 0, None
    if resuming:
        changes: list[str] = []

        def check(meta: dict[str, Any], path: Path) -> None:
            changes[:] = check_resumable(cfg, setup.steps_per_epoch, meta, path)

        restored = checkpoint.restore(ckpt_dir, abstract_like(setup.state), check_meta_fn=check)
        setup.state, start = restored.state, restored.step
        for note in restored.notes:
            log_fn(note)
        if changes:
            log_fn("config changes since the checkpoint (allowed): " + "; ".join(changes))
        if start > setup.total_steps:
            raise UserError(
                f"the checkpoint {restored.path} is at step {start}, past the "
                f"{setup.total_steps} steps this config trains; raise train.steps or "
                "train.epochs to continue it"
            )
        log_fn(f"resuming from {restored.path} (step {start} of {setup.total_steps})")
        resume_event = {
            "event": "resume",
            "step": start,
            "checkpoint": str(restored.path),
            "notes": restored.notes,
            "changes": changes,
        }
        if start == setup.total_steps and (run_dir / "summary.json").exists():
            log_fn("the run is already complete; nothing to do")
            return json.loads((run_dir / "summary.json").read_text())
    writers: list[MetricWriter] = []
    if is_main:
        _make_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if resume_event is not None:
            truncate_metrics(run_dir / "metrics.jsonl", start)
        writers.append(JsonlWriter(run_dir / "metrics.jsonl"))
        if resume_event is not None:
            writers[0].write(resume_event)
        if cfg.output.tensorboard:
            # metrics.jsonl keeps the events up to `start`; TensorBoard hides the later ones.
            purge = None if resume_event is None else start + 1
            writers.append(TensorBoardWriter(run_dir / TENSORBOARD_DIR, purge_step=purge))
        if not quiet:
            writers.append(ProgressWriter())
    writer = MultiWriter(writers) if writers else NullWriter()
    ckpt = None
    if cfg.checkpoint.enabled:
        ckpt = checkpoint.Checkpointer(
            ckpt_dir,
            cfg.checkpoint,
            steps_per_epoch=setup.steps_per_epoch,
            total_steps=setup.total_steps,
        )
    try:
        with PreemptionGuard() as guard:
            summary = run(
                setup,
                writer,
                start_step=start,
                checkpointer=ckpt,
                guard=guard,
                description=description,
            )
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()  # pending async writes complete before the process goes on or exits
    summary["run_dir"] = str(run_dir)
    if summary["status"] == "preempted":
        where = summary["checkpoint"] if ckpt is not None else None
        raise Preempted(
            f"{summary['signal']} after step {summary['steps']} of {setup.total_steps}; "
            + (
                f"checkpoint written to {where}. Continue with: accelctl train "
                f"{run_dir / 'config.yaml'} --run-dir {run_dir} --resume"
                if where
                else "no checkpoint was written (checkpoint.enabled is false)"
            )
        )
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
