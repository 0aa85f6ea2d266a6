"""The run summary (`summary.json`): where the run ended, on what, how fast, and where the time
went, from the process's start to the summary."""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from accelctl import data
from accelctl.checkpoint import Checkpointer
from accelctl.devices import cpu_devices_report
from accelctl.distributed import host_value
from accelctl.train.job import Job
from accelctl.train.loop import Loop
from accelctl.train.state import TrainState, digest

_IMPORTED = time.perf_counter()


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since accelctl's import)."""
    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime: ticks after boot
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def _loss_scale_fields(state: TrainState) -> dict[str, Any]:
    """fp16 runs: steps skipped for overflow and the loss scale at the end."""
    if state.loss_scale is None:
        return {}
    ls = jax.device_get(state.loss_scale)
    return {"overflow_steps": int(ls.overflows), "loss_scale": float(ls.scale)}


def describe(job: Job, state: TrainState, done: int) -> dict[str, Any]:
    """The summary fields that say where the run ended and on what (no timings)."""
    spe, cfg = job.sizes.steps_per_epoch, job.cfg
    device = job.mesh.devices.flat[0]
    return {
        "steps": done,
        "total_steps": job.sizes.total_steps,
        "epochs": done / spe,
        "steps_per_epoch": spe,
        "global_batch_size": job.sizes.batch,
        "devices": int(job.mesh.devices.size),
        "device_kind": device.device_kind,
        "platform": device.platform,
        # How the host CPU was split into XLA devices, and why (`--cpu-devices`, auto by default).
        "cpu_devices": cpu_devices_report(device.platform),
        "mesh": dict(job.mesh.shape),
        "processes": jax.process_count(),
        "num_params": job.state.num_params,
        "params_sha256": digest(host_value((state.params, state.model_state))),
        "skipped_steps": int(jax.device_get(state.skipped)),
        "strategy": job.state.strategy,
        "strategy_reason": job.state.strategy_reason,
        "precision": cfg.precision.compute,
        "accumulate_steps": cfg.optimizer.accumulate_steps,
        **_loss_scale_fields(state),
        "data_cache": job.feed.cache_mode,
        # Where the input pipeline stands: a resumed run starts its data here.
        "data_position": data.DataPosition.at(
            done, steps_per_epoch=spe, seed=cfg.train.seed
        ).to_dict(),
    }


def summarize(
    job: Job,
    loop: Loop,
    checkpointer: Checkpointer | None,
    *,
    startup_s: float,
    setup_s: float,
    final_eval_s: float = 0.0,
) -> dict[str, Any]:
    """The whole summary of a finished (or preempted) loop.

    Args:
        job: the job.
        loop: the loop after `run()` (its final state, evaluation and timings).
        checkpointer: the run's checkpointer, or None.
        startup_s: seconds from the process's start to the start of the job's setup (imports,
            config, distributed start-up).
        setup_s: seconds spent building the job and initialising/restoring the state,
            including the train step's compile.
        final_eval_s: an evaluation after the loop (a run resumed at its last step).
    Returns:
        The summary dict (see the README's run-directory table).
    """
    last = loop.last_checkpoint
    # First: a trace the loop left running (it stopped inside the window) is stopped here.
    profile = loop.profiler.finish(loop) if loop.profiler is not None else None
    t = loop.timings
    train_s = max(loop.end - loop.wall0 - t.total(), 0.0)
    wall = process_age_s()
    compile_s = job.steps.compile_time_s
    parts = {
        "startup": startup_s,
        "setup": max(setup_s - compile_s, 0.0),
        "compile": compile_s,
        "train": train_s,
        "eval": t.get("eval") + final_eval_s,
        "checkpoint": t.get("checkpoint"),
        "profile": t.get("profile"),
    }
    parts["other"] = max(wall - sum(parts.values()), 0.0)
    return {
        "status": "preempted" if loop.stop else "completed",
        "signal": loop.stop,
        "final_eval": loop.last_eval,
        "final_eval_step": loop.last_eval_step if loop.last_eval_step >= 0 else None,
        "start_step": loop.start_step,
        "train_samples_per_s": loop.samples_per_s(),
        **describe(job, loop.state, loop.done),
        "checkpoint": str(checkpointer.path_of(last)) if checkpointer and last else None,
        "best_checkpoint": checkpointer.best if checkpointer is not None else None,
        "compile_time_s": compile_s,
        # The process's real wall time so far, and its parts (they add up to it).
        "wall_time_s": wall,
        "time_s": {
            k: parts[k]
            for k in (
                "startup",
                "setup",
                "compile",
                "train",
                "eval",
                "checkpoint",
                "profile",
                "other",
            )
        },
        "loop_time_s": loop.end - loop.wall0,
        "eval_time_s": parts["eval"],
        # What the loop waited for checkpoints (with async: the copy off the devices only).
        "checkpoint_time_s": parts["checkpoint"],
        "checkpoints_saved": t.counts.get("checkpoint", 0),
        **loop.input_wait(),
        "traces": dict(job.steps.traces),
        # `--profile START:COUNT`: the trace's folder, the steps traced, the most expensive
        # device operations and the input wait over them (accelctl.profile.summarize); else None.
        "profile": profile,
    }
