"""The host loop: feed prefetched batches to the compiled step; everything else is a hook.

The loop is a short `for`: dispatch a step, then run the hooks that are due (Levanter's
`add_hook(fn, every=N)`): metric reads, evaluation, preemption checks, checkpoints, progress.
Each hook owns its cadence; time spent in hooks that are not training (evaluation,
checkpoints) is measured with `timed(...)` and kept out of the throughput.

The loop never waits on the device except (a) once after the first step, to start the
steady-state clock, (b) when it reads the *previous* interval's metric sums, by which time they
are long computed, and (c) at evaluations and checkpoints. Events are written in step order:
an evaluation or a checkpoint (which wait for the device anyway) first writes the train
interval that is still pending.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jax

from accelctl.errors import NonFiniteLoss
from accelctl.metrics import MetricWriter
from accelctl.train.job import Job
from accelctl.train.state import TrainState

# Steps the host may dispatch ahead of the device. Far more than needed to hide the host's
# work; unbounded, XLA:CPU with several (fake) devices deadlocks in the step's all-reduce
# rendezvous once a few hundred steps are queued on a small machine.
MAX_IN_FLIGHT = 16


def bound_in_flight(queue: deque[Any], out: Any, limit: int | None = None) -> None:
    """Record a step's (non-donated) output; wait for the oldest once more than `limit`
    (default MAX_IN_FLIGHT) are queued."""
    queue.append(out)
    if len(queue) > (limit or MAX_IN_FLIGHT):
        jax.block_until_ready(queue.popleft())


class Timings:
    """Seconds spent per named phase (`timed("eval")`), and their total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.counts[name] = self.counts.get(name, 0) + 1

    def total(self) -> float:
        return sum(self.seconds.values())

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


@dataclass
class Hook:
    """`fn(loop)` after every step for which `due(step)` is true (step = updates done); with
    `at_start`, also before the first step when `due(start_step)` holds."""

    name: str
    due: Callable[[int], bool]
    fn: Callable[[Loop], None]
    at_start: bool = False


def every(n: int | None, *, total: int, at_end: bool = True) -> Callable[[int], bool]:
    """A cadence: every n steps (never when n is None), and at the last step when `at_end`."""
    if n is None:
        return (lambda step: step == total) if at_end else (lambda step: False)
    if at_end:
        return lambda step: step % n == 0 or step == total
    return lambda step: step % n == 0


@dataclass
class Interval:
    """One log interval's metric sums, still on the device until the next read."""

    step: int
    steps: int
    sums: Any
    seconds: float


def evaluate(
    job: Job, params: Any, model_state: Any, *, beat: Callable[[], None] | None = None
) -> dict[str, float]:
    """Run the eval split through the eval step: it reads only the parameters and the model
    state (a checkpoint evaluated alone restores nothing else).

    Returns:
        {"loss", "accuracy", "count"} with host floats, and the device sums under "_sums".
    """
    steps = job.steps
    sums = steps.zero_eval_sums()
    with job.feed.eval_inputs(job.sizes.eval_batch) as batches:
        for batch in batches:
            sums = steps.eval(params, model_state, batch, sums)
            if beat is not None:
                beat()
    host = jax.device_get(sums)
    count = max(float(host["count"]), 1.0)
    return {
        "loss": float(host["loss_sum"]) / count,
        "accuracy": float(host["correct"]) / count,
        "count": int(host["count"]),
        "_sums": sums,
    }


@dataclass
class Loop:
    """One pass of the host loop from `start_step` to the job's last step.

    Hooks read and may replace `state` (evaluation feeds the plateau controller) and may set
    `stop` (preemption); `pending` is the train interval whose sums are not read yet.
    """

    job: Job
    state: TrainState
    writer: MetricWriter
    start_step: int = 0
    hooks: list[Hook] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    done: int = 0
    stop: str | None = None
    pending: Interval | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int = -1
    description: str = "train"
    last_checkpoint: int | None = None  # step of the last checkpoint written (the hook sets it)
    watchdog: Any = None  # train.watchdog.Watchdog: told of every step, or None
    checkpoint_path_fn: Callable[[int], Any] | None = None
    inputs: Any = None  # the open train-batch iterator while running (its wait_time_s)
    profiler: Any = None  # train.hooks.ProfileHook when steps are traced, or None
    # Throughput clock: starts after the first step (its compile and first dispatch excluded).
    steady_t0: float | None = None
    steady_step: int = 0
    steady_wait0: float = 0.0
    wait_s: float = 0.0
    wall0: float = 0.0
    end: float = 0.0

    def add_hook(
        self,
        name: str,
        due: Callable[[int], bool],
        fn: Callable[[Loop], None],
        *,
        at_start: bool = False,
    ) -> None:
        """Run `fn(self)` after every step where `due(step)` holds, in the order added (with
        `at_start`, also before the first step when `due(start_step)` holds)."""
        self.hooks.append(Hook(name, due, fn, at_start))

    @property
    def total(self) -> int:
        return self.job.sizes.total_steps

    def flush(self) -> None:
        """Write the pending train interval now (callers have waited for the device already).

        Raises:
            NonFiniteLoss: the interval had a non-finite step and `train.on_nan` is stop.
        """
        if self.pending is None:
            return
        iv, self.pending = self.pending, None
        sums = jax.device_get(iv.sums)
        tc = self.job.cfg.train
        if sums["skipped"] and tc.on_nan == "stop":
            raise self.nonfinite()
        count = float(sums["count"])
        applied = iv.steps - int(sums["skipped"]) - int(sums["overflow"])
        per_s = iv.steps / iv.seconds if iv.seconds > 0 else float("nan")
        spe = self.job.sizes.steps_per_epoch
        event = {
            "event": "train",
            "step": iv.step,
            "epoch": (iv.step - 1) // spe + 1,
            "loss": float(sums["loss_sum"]) / count if count else float("nan"),
            "accuracy": float(sums["correct"]) / count if count else float("nan"),
            "lr": float(sums["lr"]),
            "grad_norm": float(sums["grad_norm"]) / applied if applied > 0 else float("nan"),
            "skipped": int(sums["skipped"]),
            "steps_per_s": per_s,
            "samples_per_s": per_s * self.job.sizes.batch,
            "time_s": time.perf_counter() - self.wall0,
        }
        if self.job.cfg.precision.compute == "fp16":
            # fp16 loss scaling: steps skipped because the scaled gradients overflowed.
            event["overflow"] = int(sums["overflow"])
        self.writer.write(event)

    def nonfinite(self) -> NonFiniteLoss:
        """The error that stops a run on a non-finite step (`train.on_nan: stop`)."""
        first = int(jax.device_get(self.state.first_skipped))
        last = self.last_checkpoint
        good = (
            f"The last good checkpoint is {self.checkpoint_path_fn(last)} (step {last}): "
            "continue from it ({resume}) after changing what diverged (e.g. a lower "
            "optimizer.lr)"
            if last is not None and self.checkpoint_path_fn is not None
            else "No checkpoint was written before it"
        )
        return NonFiniteLoss(
            f"step {first}: the loss or the gradients were not finite, so training stopped "
            f"(train.on_nan: stop; the update of that step was not applied). {good}. To skip "
            "such steps and go on instead, set train.on_nan: skip."
        )

    def run(self) -> Loop:
        """Train to the last step (or until a hook sets `stop`); returns self with the results."""
        job, total = self.job, self.total
        train_step, hooks = job.steps.train, self.hooks
        beat = self.watchdog.beat if self.watchdog is not None else None
        in_flight: deque[Any] = deque()
        self.done = self.start_step
        self.writer.start(total, self.description)
        self.wall0 = time.perf_counter()
        with job.feed.train_inputs(
            seed=job.cfg.train.seed,
            start_step=self.start_step,
            num_steps=total,
            depth=job.cfg.data.prefetch,
        ) as batches:
            self.inputs = batches
            for hook in hooks:
                if hook.at_start and hook.due(self.done):
                    hook.fn(self)
            for step in range(self.start_step, total):
                self.state, out = train_step(self.state, next(batches))
                self.done = done = step + 1
                bound_in_flight(in_flight, out)
                if beat is not None:
                    beat()
                if self.steady_t0 is None:
                    # One sync after the first step: throughput is measured from here on.
                    jax.block_until_ready(self.state.step)
                    self.steady_t0, self.steady_step = time.perf_counter(), done
                    self.steady_wait0 = batches.wait_time_s
                for hook in hooks:
                    if hook.due(done):
                        hook.fn(self)
                if self.stop:
                    break
            jax.block_until_ready(self.state)
            self.end = time.perf_counter()
            self.wait_s = batches.wait_time_s
            self.inputs = None
        self.flush()
        if self.stop:
            saved = self.last_checkpoint == self.done and self.checkpoint_path_fn is not None
            where = str(self.checkpoint_path_fn(self.done)) if saved else None  # type: ignore[misc]
            self.writer.write(
                {"event": "preempted", "step": self.done, "signal": self.stop, "checkpoint": where}
            )
        return self

    def samples_per_s(self) -> float:
        """Steady-state training throughput: after the first step, hooks' timed phases out."""
        batch = self.job.sizes.batch
        steady_t0 = self.steady_t0 if self.steady_t0 is not None else self.end
        steady_step = self.steady_step if self.steady_t0 is not None else self.done
        steady_s = self.end - steady_t0 - self.timings.total()
        steps = self.done - steady_step
        if steps and steady_s > 0:
            return steps * batch / steady_s
        train_s = self.end - self.wall0 - self.timings.total()
        return (self.done - self.start_step) * batch / train_s if train_s > 0 else 0.0

    def input_wait(self) -> dict[str, float]:
        """Seconds waited for input, as fractions of the training time (all / steady state)."""
        train_s = self.end - self.wall0 - self.timings.total()
        steady_t0 = self.steady_t0 if self.steady_t0 is not None else self.end
        steady_s = self.end - steady_t0 - self.timings.total()
        return {
            "input_wait_s": self.wait_s,
            "input_wait_fraction": self.wait_s / train_s if train_s > 0 else 0.0,
            "steady_input_wait_fraction": (self.wait_s - self.steady_wait0) / steady_s
            if steady_s > 0
            else 0.0,
        }
