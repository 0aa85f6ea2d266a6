"""Training: state, pure steps, the job, and the host loop; `train()` runs a whole job.

Read `train()` top to bottom: check the run directory, build the job (nothing allocated yet),
initialise the state or restore it, open the writers and the checkpointer, run the loop with
its hooks, write the summary.
"""

from __future__ import annotations

import json
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelctl.checkpoint import CHECKPOINT_DIR
from accelctl.config import Config
from accelctl.errors import Preempted, UserError
from accelctl.train.rundir import (
    check_run_dir,
    check_run_dir_path,
    default_run_dir,
    open_writers,
    stop_on_memory_errors,
    stop_on_output_errors,
    wants_resume,
    write_atomically,
)

__all__ = ["default_run_dir", "fit", "train"]


def _stderr(message: str) -> None:
    print(f"accelctl: {message}", file=sys.stderr, flush=True)


def _restore(job: Any, run_dir: Path, log_fn: Callable[[str], None]) -> tuple[Any, int, dict]:
    """Restore the newest good checkpoint of `run_dir` straight into the job's abstract state.

    Returns:
        (state, step, the `resume` event for metrics.jsonl).
    """
    from accelctl import checkpoint
    from accelctl.train.resume import check_resumable

    changes: list[str] = []

    def check(meta: dict[str, Any], path: Path) -> None:
        changes[:] = check_resumable(job.cfg, job.sizes.steps_per_epoch, meta, path)

    restored = checkpoint.restore(
        run_dir / CHECKPOINT_DIR, job.state.abstract, check_meta_fn=check, move_aside=True
    )
    start, total = restored.step, job.sizes.total_steps
    for note in restored.notes:
        log_fn(note)
    if changes:
        log_fn("config changes since the checkpoint (allowed): " + "; ".join(changes))
    if start > total:
        raise UserError(
            f"the checkpoint {restored.path} is at step {start}, past the {total} steps this "
            "config trains; raise train.steps or train.epochs to continue it"
        )
    log_fn(f"resuming from {restored.path} (step {start} of {total})")
    event = {
        "event": "resume",
        "step": start,
        "checkpoint": str(restored.path),
        "notes": restored.notes,
        "changes": changes,
    }
    return restored.state, start, event


def fit(job: Any, state: Any = None, writer: Any = None) -> dict[str, Any]:
    """Train a built job in memory: no run directory, no checkpoints, no signal handling.

    Args:
        job: from `accelctl.train.job.build_job`.
        state: the state to start from (its step is the start step); None = the fresh state
            (`init_from.initial_state`: random, or `model.init_from`'s weights).
        writer: receives the events (None: discarded).
    Returns:
        The summary, as `train` writes it (without run_dir); the final state is not returned.
    """
    import jax

    from accelctl.metrics import NullWriter
    from accelctl.train.hooks import add_standard_hooks
    from accelctl.train.init_from import initial_state
    from accelctl.train.loop import Loop
    from accelctl.train.summary import summarize

    with stop_on_memory_errors(None):
        state = initial_state(job) if state is None else state
        loop = Loop(job, state, writer or NullWriter(), start_step=int(jax.device_get(state.step)))
        add_standard_hooks(loop, checkpointer=None, guard=None)
        loop.run()
    loop.writer.close()
    return summarize(job, loop, None, startup_s=0.0, setup_s=job.steps.compile_time_s)


def train(
    config: Config | str | Path,
    overrides: Sequence[str] = (),
    *,
    run_dir: Path | str | None = None,
    resume: bool = False,
    quiet: bool = False,
    model: Any = None,
    data: Any = None,
    profile: str | None = None,
    description: str | None = None,
    log_fn: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Run a whole training job (or continue one) and write its run directory.

    The command line (`accelctl train`) calls this function; so can a notebook:

        import accelctl
        summary = accelctl.train("config.yaml", ["train.steps=200"], model=MyModel, data=load)

    Args:
        config: a validated Config, a YAML file, or a built-in config's name.
        overrides: `KEY=VALUE` strings applied to a file or name, validated like it.
        run_dir: where config.yaml, metrics.jsonl, tensorboard/, summary.json and checkpoints/
            go (default `<output.root>/<name>-<timestamp>/`). A fresh run needs it free of a
            previous run; a resumed one continues the run there.
        resume: continue from the newest good checkpoint in run_dir (also with
            `checkpoint.resume: auto` when one exists).
        quiet: no progress output.
        model: the user's model itself instead of `model.target`: an NNX Module class, a factory
            returning one, or a flax.linen Module class, built with `model.args` (when the config
            has them) plus rngs= (see accelctl/models/custom.py for the call contract).
        data: the user's data itself instead of `data.target`: a loader called with
            `data.args`, or what a loader returns ({"train": ..., "eval": ...}).
        profile: "START:COUNT": trace those steps with jax.profiler into `<run_dir>/profile/`
            and summarise the most expensive device operations (summary.json `profile`).
        description: progress-bar label (default: the config's name).
        log_fn: receives one-line notices (resume, fallbacks, allowed config changes).
    Returns:
        The summary (also written to run_dir/summary.json).
    Raises:
        UserError: bad input or an unusable checkpoint (exit 2); NonFiniteLoss (exit 3);
            Preempted after a signal, once the checkpoint is written (exit 75); OutOfMemory
            (exit 5): refused before allocating when the sizes say it cannot fit, or XLA /
            numpy ran out of memory (accelctl.memory).
    """
    from accelctl import config as config_mod

    name = "config"
    if not isinstance(config, Config):
        name = Path(str(config)).stem
        config = config_mod.load(config, overrides)
    elif overrides:
        raise UserError("overrides apply to a config file or name; got a Config object")
    cfg = _with_objects(config, model, data)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, name)
    with stop_on_memory_errors(run_dir):
        return _train(
            cfg,
            run_dir,
            resume=resume,
            quiet=quiet,
            objects={k: v for k, v in (("model", model), ("data_source", data)) if v is not None},
            profile=profile,
            description=description or name,
            log_fn=log_fn,
        )


def _with_objects(cfg: Config, model: Any, data: Any) -> Config:
    """The config that records objects passed in place of import paths (by their qualified
    names, so the run directory says what was trained)."""
    from accelctl import config as config_mod

    updates: dict[str, Any] = {}
    if model is not None:
        current = cfg.to_dict()["model"]
        updates["model"] = {
            "target": _qualname(model),
            "args": dict(current.get("args", {})) if current.get("name") == "custom" else {},
            # How to compute and where to start from apply to whichever model it is.
            **{k: current[k] for k in ("remat", "init_from") if k in current},
        }
    if data is not None:
        current = cfg.to_dict()["data"]
        args = current.get("args", {}) if current.get("source") == "python" else {}
        updates["data"] = {"source": "python", "target": _qualname(data), "args": args}
    return config_mod.replace(cfg, updates, merge=False) if updates else cfg


def _qualname(obj: Any) -> str:
    """`module:Qualified.Name` of a class or function (the type's, for other objects)."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    module = getattr(target, "__module__", None) or "__main__"
    name = target.__qualname__.replace(".<locals>.", ".").replace("<lambda>", "lambda_")
    name = ".".join(p if p.isidentifier() else "obj" for p in name.split("."))
    return f"{module}:{name}"


def _train(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool,
    quiet: bool,
    objects: dict[str, Any],
    profile: str | None,
    description: str,
    log_fn: Callable[[str], None],
) -> dict[str, Any]:
    """`train` for a resolved config and run directory (see there)."""
    import jax

    from accelctl.train.job import build_job
    from accelctl.train.summary import process_age_s, summarize

    startup_s, t0 = process_age_s(), time.perf_counter()
    check_run_dir_path(run_dir)
    resuming, restart = wants_resume(cfg, run_dir, resume)
    if not resuming and not restart:
        check_run_dir(run_dir)
    job = build_job(cfg, **objects)  # config/data errors surface before anything is written
    state, start, resume_event = _start_state(job, run_dir, resuming, restart, log_fn)
    if resume_event and start == job.sizes.total_steps and (run_dir / "summary.json").exists():
        log_fn("the run is already complete; nothing to do")
        return json.loads((run_dir / "summary.json").read_text())
    request = _profile_request(profile, run_dir, start, job.sizes.total_steps)
    setup_s = time.perf_counter() - t0
    with stop_on_output_errors(run_dir):
        writer = open_writers(cfg, run_dir, resume_event, quiet=quiet)
    ckpt = _checkpointer(job, run_dir)
    loop = _run_loop(job, state, writer, ckpt, start, description, request, run_dir)
    final_eval_s = _final_eval(job, loop)
    summary = summarize(
        job, loop, ckpt, startup_s=startup_s, setup_s=setup_s, final_eval_s=final_eval_s
    )
    summary["run_dir"] = str(run_dir)
    if loop.stop:
        raise _preempted(loop, summary["checkpoint"], run_dir)
    if jax.process_index() == 0:
        with stop_on_output_errors(run_dir):
            write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _start_state(
    job: Any, run_dir: Path, resuming: bool, restart: bool, log_fn: Callable[[str], None]
) -> tuple[Any, int, dict | None]:
    """(state, start step, the `resume` event or None): restored from the newest good
    checkpoint, or fresh (random, or `model.init_from`'s weights)."""
    from accelctl.train.init_from import initial_state

    if resuming:
        if getattr(job.cfg.model, "init_from", None) is not None:
            log_fn("model.init_from is ignored: a resumed run continues from its own checkpoint")
        return _restore(job, run_dir, log_fn)
    state = initial_state(job, log_fn=log_fn)
    if not restart:
        return state, 0, None
    log_fn(
        f"{run_dir} holds no checkpoint yet (the run stopped before its first one): "
        "starting it again from step 0"
    )
    event = {"event": "resume", "step": 0, "checkpoint": None, "notes": [], "changes": []}
    return state, 0, event


def _profile_request(profile: str | None, run_dir: Path, start: int, total: int) -> Any:
    """The profiler window `START:COUNT`, checked before anything is written into the run
    directory; None without --profile."""
    from accelctl import profile as profile_mod

    if profile is None:
        return None
    try:
        window = profile_mod.parse_window(profile)
    except ValueError as e:
        raise UserError(str(e), param="profile", value=profile) from None
    profile_mod.check_window(window, first_step=start, total=total)
    return profile_mod.Request(window, run_dir / "profile")


def _run_loop(
    job: Any,
    state: Any,
    writer: Any,
    ckpt: Any,
    start: int,
    description: str,
    request: Any,
    run_dir: Path,
) -> Any:
    """Run the loop with its hooks under the preemption guard and the hang watchdog; writers
    and checkpointer are closed (pending writes done) before it returns or raises."""
    import jax

    from accelctl import profile as profile_mod
    from accelctl.train.hooks import add_standard_hooks
    from accelctl.train.loop import Loop
    from accelctl.train.preempt import PreemptionGuard
    from accelctl.train.watchdog import Watchdog

    loop = Loop(job, state, writer, start_step=start, description=description)
    dump_dir = run_dir if jax.process_index() == 0 else None
    with stop_on_output_errors(run_dir):
        try:
            with PreemptionGuard() as guard, Watchdog(job.cfg.train.hang_timeout, dump_dir) as dog:
                loop.watchdog = dog
                add_standard_hooks(loop, checkpointer=ckpt, guard=guard, profile=request)
                loop.run()
        except BaseException:
            _close_quietly(writer, ckpt)  # the first error is the one to report
            raise
        finally:
            profile_mod.stop_if_running()  # a trace a failed run left running is written
        writer.close()
        if ckpt is not None:
            ckpt.close()  # pending async writes complete before the process goes on or exits
    return loop


def _close_quietly(writer: Any, ckpt: Any) -> None:
    """Close the writers and the checkpointer (joining their threads) while another error is
    on its way out; their own errors (e.g. the same full disk again) are not reported twice."""
    for close in (writer.close, ckpt.close if ckpt is not None else None):
        if close is None:
            continue
        try:
            close()
        except Exception:  # noqa: BLE001, S110 - the error being raised says what went wrong
            pass


def _checkpointer(job: Any, run_dir: Path) -> Any:
    """The run's Checkpointer, or None when `checkpoint.enabled` is false."""
    from accelctl import checkpoint

    cfg = job.cfg.checkpoint
    if not cfg.enabled:
        return None
    return checkpoint.Checkpointer(
        run_dir / CHECKPOINT_DIR,
        cfg,
        steps_per_epoch=job.sizes.steps_per_epoch,
        total_steps=job.sizes.total_steps,
    )


def _final_eval(job: Any, loop: Any) -> float:
    """Evaluate after the loop when it ran no evaluation: a run resumed from its last step's
    checkpoint (killed before its summary) has nothing left to train, but its summary needs
    the final evaluation. Returns the seconds it took."""
    from accelctl.train.loop import evaluate

    if loop.last_eval is not None or loop.stop:
        return 0.0
    t0 = time.perf_counter()
    metrics = evaluate(job, loop.state.params, loop.state.model_state)
    metrics.pop("_sums")
    loop.last_eval, loop.last_eval_step = metrics, loop.done
    return time.perf_counter() - t0


def _preempted(loop: Any, checkpoint: str | None, run_dir: Path) -> Preempted:
    written = (
        f"checkpoint written to {checkpoint}"
        if checkpoint
        else "no checkpoint was written (checkpoint.enabled is false)"
    )
    return Preempted(
        f"{loop.stop} after step {loop.done} of {loop.total}; {written}",
        run_dir=run_dir,
        step=loop.done,
        checkpoint=checkpoint,
    )


class _CallableModule(types.ModuleType):
    """`accelctl.train(...)` calls `train`: the package attribute is this module (Python binds a
    subpackage to its parent's attribute on import), so the module itself is made callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
