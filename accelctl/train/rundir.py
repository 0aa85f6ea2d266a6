"""The run directory: where a run may write, what it holds, writing into it, and stopping with
one clear error when writing (exit 74) or memory (exit 5) fails on the way."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelctl.checkpoint import CHECKPOINT_DIR, complete_steps, incomplete_checkpoints
from accelctl.config import Config
from accelctl.errors import (
    AccelctlError,
    OutputError,
    UserError,
    describe_output_failure,
)

OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT_DIR)


def default_run_dir(cfg: Config, config_name: str) -> Path:
    """`<output.root>/<name>-<timestamp>/` with name = output.name or the config file's stem."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.output.name or config_name}-{stamp}"


def check_run_dir_path(run_dir: Path) -> None:
    """A run directory must be a folder the OS accepts and this process can create or write,
    and must not lie inside another run's checkpoints/ (where `eval --checkpoint` of that run
    would take it for a checkpoint)."""
    from accelctl.outputs import check_output_dir

    check_output_dir(run_dir, param="run_dir")
    for parent in Path(os.path.abspath(run_dir)).parents:
        if parent.name == CHECKPOINT_DIR and (parent.parent / "config.yaml").is_file():
            raise UserError(
                f"lies inside the checkpoints folder of the run in {parent.parent}; choose a "
                "folder outside it",
                param="run_dir",
                value=run_dir,
            )


def check_run_dir(run_dir: Path) -> None:
    # An empty checkpoints/ folder (e.g. a mount point prepared for them) holds no run yet.
    existing = [
        name
        for name in OUTPUTS
        if (run_dir / name).exists()
        and not (
            name == CHECKPOINT_DIR
            and (run_dir / name).is_dir()
            and not any((run_dir / name).iterdir())
        )
    ]
    if existing:
        raise UserError(
            f"already holds a run ({', '.join(existing)}); nothing was overwritten. Continue it "
            "with {resume}, choose a new {run_dir}, or leave it out for a fresh timestamped one.",
            param="run_dir",
            value=run_dir,
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            "is a file, not a directory; choose another path", param="run_dir", value=run_dir
        )


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the run directory ({e})", param="run_dir", value=run_dir
        ) from None


def wants_resume(cfg: Config, run_dir: Path, resume: bool) -> tuple[bool, bool]:
    """(resume from a checkpoint, restart a run that stopped before its first checkpoint)."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    found = bool(complete_steps(ckpt_dir) or incomplete_checkpoints(ckpt_dir))
    if resume and not found:
        if (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists():
            return False, True  # killed before its first checkpoint: it starts again at step 0
        raise UserError(
            f"{run_dir} holds no run to continue (no checkpoints, no config.yaml); leave out "
            "{resume} to start a fresh run there, or name the run directory that has them",
            param="resume",
            value="",
        )
    return resume or (cfg.checkpoint.resume == "auto" and found), False


def open_writers(cfg: Config, run_dir: Path, resume_event: dict | None, *, quiet: bool) -> Any:
    """Process 0's writers (metrics.jsonl, TensorBoard, progress); a NullWriter elsewhere."""
    import jax

    from accelctl.metrics import (
        TENSORBOARD_DIR,
        JsonlWriter,
        MetricWriter,
        MultiWriter,
        NullWriter,
        ProgressWriter,
        TensorBoardWriter,
    )
    from accelctl.train.resume import truncate_metrics

    if jax.process_index() != 0:
        return NullWriter()
    make_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    start = resume_event["step"] if resume_event else None
    if start is not None:
        truncate_metrics(run_dir / "metrics.jsonl", start)
    writers: list[MetricWriter] = [JsonlWriter(run_dir / "metrics.jsonl")]
    if resume_event is not None:
        writers[0].write(resume_event)
    if cfg.output.tensorboard:
        # metrics.jsonl keeps the events up to `start`; TensorBoard hides the later ones.
        purge = None if start is None else start + 1
        writers.append(TensorBoardWriter(run_dir / TENSORBOARD_DIR, purge_step=purge))
    if not quiet:
        writers.append(ProgressWriter())
    return MultiWriter(writers)


def write_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary one in the same folder: readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def stop_on_output_errors(run_dir: Path) -> Iterator[None]:
    """Turn a failure to write into the run directory (disk full, read-only, removed) into one
    OutputError naming the path and the last complete checkpoint (exit 74)."""
    try:
        yield
    except AccelctlError:
        raise
    except Exception as e:
        reason = describe_output_failure(e)
        if reason is None:
            raise
        steps = complete_steps(run_dir / CHECKPOINT_DIR)
        last = (
            f"The last complete checkpoint is {run_dir / CHECKPOINT_DIR / str(steps[-1])} "
            f"(step {steps[-1]}): free space or fix the folder, then continue with {{resume}}."
            if steps
            else "No checkpoint was completed; free space or fix the folder and start again."
        )
        raise OutputError(
            f"could not write into the run directory {run_dir}: {reason}. Training stopped. {last}"
        ) from None


def stop_on_memory_errors(run_dir: Path | None) -> contextlib.AbstractContextManager[None]:
    """Turn running out of host or device memory (XLA's RESOURCE_EXHAUSTED, numpy's
    MemoryError) into one OutOfMemory with the bytes and the ways out (exit 5), naming the
    run's last complete checkpoint. Writers and checkpointer are closed by then (`_train`), so
    everything written is kept; the original error stays the cause (shown with --debug)."""
    from accelctl.memory import stop_on_out_of_memory

    return stop_on_out_of_memory(None if run_dir is None else lambda: after_out_of_memory(run_dir))


def after_out_of_memory(run_dir: Path) -> str:
    """How to go on after running out of memory: which changes a resume may make."""
    steps = complete_steps(run_dir / CHECKPOINT_DIR)
    if not steps and not (run_dir / "config.yaml").is_file():
        return f"Nothing was written to {run_dir}."
    if not steps:
        return (
            "No checkpoint was written: {resume} starts this run directory again from step 0 "
            "with the changed config."
        )
    return (
        f"The last complete checkpoint is {run_dir / CHECKPOINT_DIR / str(steps[-1])} (step "
        f"{steps[-1]}): continuing it with {{resume}} may change parallel.strategy, "
        "train.eval_batch_size, data.prefetch and data.cache; a smaller batch, "
        "optimizer.accumulate_steps or model.remat change the training itself and need a new run."
    )
