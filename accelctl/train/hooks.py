"""The loop's hooks, each with its own cadence: metric reads, evaluation, preemption checks,
checkpoints, progress and profiling. `add_standard_hooks` installs them in the order they must
run after a step: stop a profile, read metrics, evaluate, decide whether to stop, checkpoint,
start a profile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any

import jax

import accelctl
from accelctl import data
from accelctl import profile as profile_mod
from accelctl.checkpoint import Checkpointer
from accelctl.distributed import any_process
from accelctl.train.loop import Interval, Loop, evaluate, every
from accelctl.train.preempt import PreemptionGuard


class MetricsHook:
    """Every `train.log_every` steps: take the interval's metric sums (on the device) and write
    the previous interval's, whose values are long computed by now (no host stall)."""

    def __init__(self, loop: Loop) -> None:
        self.last_step = loop.start_step
        self.last_time = time.perf_counter()
        self.excluded = loop.timings.total()

    def __call__(self, loop: Loop) -> None:
        loop.state, sums = loop.job.steps.take_sums(loop.state)
        now, excluded = time.perf_counter(), loop.timings.total()
        # Time spent in evaluations and checkpoints is not training time.
        seconds = now - self.last_time - (excluded - self.excluded)
        loop.flush()
        loop.pending = Interval(loop.done, loop.done - self.last_step, sums, seconds)
        self.last_step, self.last_time, self.excluded = loop.done, now, excluded


def eval_hook(loop: Loop) -> None:
    """Evaluate on the eval split; feed the plateau controller when it watches the eval loss."""
    # Evaluation needs this state anyway; waiting for it here keeps the queued train steps out
    # of the eval time that is subtracted from the throughput.
    jax.block_until_ready(loop.state)
    dog = loop.watchdog
    # The first evaluation compiles its step, which may take long: not a hang.
    first = "eval_step" not in loop.job.steps.traces
    with loop.timings.timed("eval"), _paused(dog if first else None):
        loop.flush()  # the train interval before this evaluation is written first
        beat = dog.beat if dog is not None else None
        metrics = evaluate(loop.job, loop.state.params, loop.state.model_state, beat=beat)
        sums = metrics.pop("_sums")
        if loop.job.steps.plateau is not None:
            loop.state = loop.job.steps.plateau(loop.state, sums)
        loop.last_eval, loop.last_eval_step = metrics, loop.done
        spe = loop.job.sizes.steps_per_epoch
        epoch = (loop.done - 1) // spe + 1
        loop.writer.write({"event": "eval", "step": loop.done, "epoch": epoch, **metrics})


def preemption_hook(guard: PreemptionGuard) -> Any:
    """After a signal, stop the loop (a checkpoint hook after it then saves).

    With several processes all of them must stop (and checkpoint) at the same step, so they
    agree at log intervals (a tiny all-gather of each one's flag), not on every signal at once.
    A signal during the last step changes nothing: the run completes normally.
    """

    def check(loop: Loop) -> None:
        if loop.done >= loop.total:
            return
        if jax.process_count() == 1:
            loop.stop = guard.requested
        elif any_process(guard.requested is not None):
            loop.stop = guard.requested or "SIGTERM (another process)"

    return check


def checkpoint_meta(loop: Loop, eval_metrics: dict[str, float] | None) -> dict[str, Any]:
    """What a checkpoint records besides the state: enough to check and continue the run."""
    job, step = loop.job, loop.done
    spe = job.sizes.steps_per_epoch
    return {
        "step": step,
        "total_steps": job.sizes.total_steps,
        "steps_per_epoch": spe,
        "data_position": data.DataPosition.at(
            step, steps_per_epoch=spe, seed=job.cfg.train.seed
        ).to_dict(),
        "eval": eval_metrics,
        "config": job.cfg.to_dict(),
        "devices": int(job.mesh.devices.size),
        "accelctl_version": accelctl.__version__,
        "jax_version": jax.__version__,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def checkpoint_hook(checkpointer: Checkpointer) -> Any:
    """Save the state (queued train steps finish first, outside the timed wait)."""

    def save(loop: Loop) -> None:
        jax.block_until_ready(loop.state)
        # Writing a large checkpoint may legitimately take long: not a hang.
        with loop.timings.timed("checkpoint"), _paused(loop.watchdog):
            # Flush the metrics up to here first: a run killed after this checkpoint has them
            # all on disk, and its resumed run logs the rest.
            loop.flush()
            on_nan_stop = loop.job.cfg.train.on_nan == "stop"
            if on_nan_stop and int(jax.device_get(loop.state.first_skipped)) >= 0:
                raise loop.nonfinite()
            evals = loop.last_eval if loop.last_eval_step == loop.done else None
            checkpointer.save(
                loop.done, loop.state, checkpoint_meta(loop, evals), eval_metrics=evals
            )
            loop.last_checkpoint = loop.done

    return save


class ProfileHook:
    """Trace steps `window.start`..`window.last` with jax.profiler into `log_dir`.

    The trace starts once step START-1 has finished on the device (so the trace holds the
    window's device work alone) and stops once step START+COUNT-1 has; starting, stopping and
    reading the trace are timed as "profile" (kept out of the throughput). What the host waited
    for input over the window is the loop's input wait then less its input wait at the start.
    """

    def __init__(self, window: profile_mod.Window, log_dir: Path, *, top: int) -> None:
        self.window, self.log_dir, self.top = window, log_dir, top
        self.tracing = False
        self.result: dict[str, Any] | None = None
        self._t0 = self._wait0 = 0.0

    def due_start(self, step: int) -> bool:
        return step == self.window.start - 1

    def due_stop(self, step: int) -> bool:
        return step == self.window.last

    def start(self, loop: Loop) -> None:
        if self.tracing or self.result is not None:
            return
        jax.block_until_ready(loop.state)  # the steps before the window stay out of the trace
        with loop.timings.timed("profile"):
            profile_mod.start_trace(self.log_dir)
        self.tracing = True
        self._t0, self._wait0 = time.perf_counter(), _input_wait_s(loop)

    def stop(self, loop: Loop) -> None:
        """Stop the trace after the last traced step (or now, when the loop ended early)."""
        if not self.tracing:
            return
        jax.block_until_ready(loop.state)  # the window's device work is in the trace
        wall, wait = time.perf_counter() - self._t0, _input_wait_s(loop) - self._wait0
        # Writing a large trace may legitimately take long: not a hang. After the loop (it
        # stopped early) this time is no longer part of the loop's, so it is not subtracted.
        running = loop.inputs is not None
        timed = loop.timings.timed("profile") if running else contextlib.nullcontext()
        with timed, _paused(loop.watchdog if running else None):
            profile_mod.stop_trace()
            self.tracing = False
            self.result = profile_mod.summarize(
                self.log_dir,
                steps=(self.window.start, loop.done),
                wall_s=wall,
                input_wait_s=wait,
                top=self.top,
            )

    def finish(self, loop: Loop) -> dict[str, Any] | None:
        """The profile for the summary; stops a trace the loop left running (it stopped before
        the window's end)."""
        self.stop(loop)
        return self.result


def _input_wait_s(loop: Loop) -> float:
    """Seconds the loop has waited for input so far (its final count once it has finished)."""
    return loop.inputs.wait_time_s if loop.inputs is not None else loop.wait_s


def add_profile_hooks(loop: Loop, request: profile_mod.Request) -> ProfileHook:
    """Check the window against the run's steps and install the two halves of a ProfileHook:
    the stop first (so a checkpoint or evaluation at the last traced step stays out of the
    trace), the start later by `add_standard_hooks` (after those at step START-1).

    Raises:
        UserError (param "profile"): the window is not inside the steps this run trains.
    """
    profile_mod.check_window(request.window, first_step=loop.start_step, total=loop.total)
    log_dir = request.log_dir
    if jax.process_count() > 1:  # jax names the files by host; processes may share one
        log_dir = log_dir / f"process_{jax.process_index()}"
    hook = ProfileHook(request.window, log_dir, top=request.top)
    loop.profiler = hook
    loop.add_hook("profile_stop", hook.due_stop, hook.stop)
    return hook


def add_standard_hooks(
    loop: Loop,
    *,
    checkpointer: Checkpointer | None,
    guard: PreemptionGuard | None,
    profile: profile_mod.Request | None = None,
) -> None:
    """Install the hooks of a training run on `loop`, in the order they run after a step.

    Args:
        loop: the loop.
        checkpointer: saves checkpoints at its cadence, or None.
        guard: the preemption guard, or None.
        profile: steps to trace (`train(..., profile=...)`), or None.
    Raises:
        UserError (param "profile"): a profile window outside the steps this run trains.
    """
    tc, total = loop.job.cfg.train, loop.total
    spe = loop.job.sizes.steps_per_epoch
    profiler = add_profile_hooks(loop, profile) if profile is not None else None
    loop.add_hook("progress", every(max(tc.log_every // 10, 1), total=total), _progress)
    loop.add_hook("metrics", every(tc.log_every, total=total), MetricsHook(loop))
    loop.add_hook("eval", every(tc.eval_every or spe, total=total), eval_hook)
    if guard is not None:
        cadence = 1 if jax.process_count() == 1 else tc.log_every
        loop.add_hook("preemption", every(cadence, total=total), preemption_hook(guard))
    if checkpointer is not None:
        loop.checkpoint_path_fn = checkpointer.path_of

        def due(step: int) -> bool:
            return loop.stop is not None or checkpointer.due(step)

        loop.add_hook("checkpoint", due, checkpoint_hook(checkpointer))
    if profiler is not None:
        loop.add_hook("profile_start", profiler.due_start, profiler.start, at_start=True)


def _progress(loop: Loop) -> None:
    """Move the progress bar to the steps dispatched so far (metrics follow one interval late)."""
    loop.writer.progress(loop.done)


def _paused(watchdog: Any) -> Any:
    """The watchdog's pause() (a phase allowed to take long), or nothing without one."""
    return watchdog.pause() if watchdog is not None else contextlib.nullcontext()
