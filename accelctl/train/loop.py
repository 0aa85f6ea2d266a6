"""The host loop: feed prefetched batches to the compiled step, read metrics one interval late.

The loop never waits on the device except (a) once after the first step, to start the
steady-state clock, (b) when it reads the *previous* interval's metric sums, by which time they
are long computed, and (c) at evaluations.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import jax

import accelctl
from accelctl import data
from accelctl.checkpoint import Checkpointer
from accelctl.distributed import any_process, host_value
from accelctl.errors import NonFiniteLoss
from accelctl.metrics import MetricWriter
from accelctl.train.preempt import PreemptionGuard
from accelctl.train.setup import Setup
from accelctl.train.state import TrainState, digest


@dataclass
class _Interval:
    step: int
    steps: int
    sums: Any  # device arrays, read later
    seconds: float


def _rates(sums: dict[str, float]) -> tuple[float, float]:
    count = max(float(sums["count"]), 1.0)
    return float(sums["loss_sum"]) / count, float(sums["correct"]) / count


def evaluate(
    setup: Setup, state: TrainState, *, update_plateau: bool = True
) -> tuple[TrainState, dict[str, float]]:
    """Run the eval split through the eval step; feed the plateau controller if it watches it
    (unless `update_plateau` is false, as for evaluating a checkpoint).

    Returns:
        (state, {"loss", "accuracy", "count"}) with host floats.
    """
    sums = setup.zero_eval_sums()
    batches = data.eval_batches(
        setup.dataset.eval,
        setup.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    with data.Prefetcher(batches, setup.put_fn, depth=2, name="accelctl-eval") as it:
        for batch in it:
            sums = setup.eval_step(state, batch, sums)
    if setup.plateau_step is not None and update_plateau:
        state = setup.plateau_step(state, sums)
    host = jax.device_get(sums)
    loss, acc = _rates(host)
    return state, {"loss": loss, "accuracy": acc, "count": int(host["count"])}


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


def _meta(setup: Setup, step: int, eval_metrics: dict[str, float] | None) -> dict[str, Any]:
    """What a checkpoint records besides the state: enough to check and continue the run."""
    spe = setup.steps_per_epoch
    return {
        "step": step,
        "total_steps": setup.total_steps,
        "steps_per_epoch": spe,
        "data_position": data.DataPosition.at(
            step, steps_per_epoch=spe, seed=setup.cfg.train.seed
        ).to_dict(),
        "eval": eval_metrics,
        "config": setup.cfg.to_dict(),
        "devices": int(setup.mesh.devices.size),
        "accelctl_version": accelctl.__version__,
        "jax_version": jax.__version__,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _nonfinite(setup: Setup, state: TrainState, checkpointer: Checkpointer | None) -> NonFiniteLoss:
    first = int(jax.device_get(state.first_skipped))
    last = checkpointer.last_saved if checkpointer is not None else None
    good = (
        f"The last good checkpoint is {checkpointer.path_of(last)} (step {last}): continue from "
        "it with --resume after changing what diverged (e.g. a lower optimizer.lr)"
        if checkpointer is not None and last is not None
        else "No checkpoint was written before it"
    )
    return NonFiniteLoss(
        f"step {first}: the loss or the gradients were not finite, so training stopped "
        f"(train.on_nan: stop; the update of that step was not applied). {good}. To skip such "
        "steps and go on instead, set train.on_nan: skip."
    )


def _preemption(guard: PreemptionGuard | None, done: int, total: int, every: int) -> str | None:
    """The signal that stops the run after step `done`, or None.

    With several processes all of them must stop (and checkpoint) at the same step, so they agree
    every `every` steps (a tiny all-gather of each one's flag), not on every signal at once.
    """
    if guard is None or done >= total:
        return None
    if jax.process_count() == 1:
        return guard.requested
    if done % every:
        return None
    if any_process(guard.requested is not None):
        return guard.requested or "SIGTERM (another process)"
    return None


def _loss_scale_fields(state: TrainState) -> dict[str, Any]:
    """fp16 runs: steps skipped for overflow and the loss scale at the end."""
    if state.loss_scale is None:
        return {}
    ls = jax.device_get(state.loss_scale)
    return {"overflow_steps": int(ls.overflows), "loss_scale": float(ls.scale)}


def _describe(
    setup: Setup, state: TrainState, checkpointer: Checkpointer | None, done: int
) -> dict[str, Any]:
    """The summary fields that describe where the run ended and on what (no timings)."""
    spe = setup.steps_per_epoch
    last = checkpointer.last_saved if checkpointer is not None else None
    return {
        "steps": done,
        "total_steps": setup.total_steps,
        "epochs": done / spe,
        "steps_per_epoch": spe,
        "global_batch_size": setup.batch_size,
        "devices": setup.mesh.devices.size,
        "device_kind": setup.mesh.devices.flat[0].device_kind,
        "platform": setup.mesh.devices.flat[0].platform,
        "mesh": dict(setup.mesh.shape),
        "processes": jax.process_count(),
        "num_params": setup.num_params,
        "params_sha256": digest(host_value((state.params, state.model_state))),
        "skipped_steps": int(jax.device_get(state.skipped)),
        "strategy": setup.strategy,
        "precision": setup.cfg.precision.compute,
        "accumulate_steps": setup.cfg.optimizer.accumulate_steps,
        **_loss_scale_fields(state),
        "data_cache": setup.cache_mode,
        # Where the input pipeline stands: a resumed run starts its data here.
        "data_position": data.DataPosition.at(
            done, steps_per_epoch=spe, seed=setup.cfg.train.seed
        ).to_dict(),
        "checkpoint": str(checkpointer.path_of(last))
        if checkpointer and last is not None
        else None,
        "best_checkpoint": checkpointer.best if checkpointer is not None else None,
    }


def run(
    setup: Setup,
    writer: MetricWriter,
    *,
    start_step: int = 0,
    checkpointer: Checkpointer | None = None,
    guard: PreemptionGuard | None = None,
    description: str = "train",
) -> dict[str, Any]:
    """Train from `start_step` to `setup.total_steps`, evaluating, logging and checkpointing.

    Args:
        setup: from `make_setup` (its state is at `start_step`, e.g. restored).
        writer: receives train/eval events.
        start_step: updates already done (a resumed run).
        checkpointer: saves on its cadence, at the end and when preempted; None = no checkpoints.
        guard: a signal sets `guard.requested`; the loop then checkpoints and stops.
        description: label of the progress bar.
    Returns:
        Summary dict: status ("completed" or "preempted"), final_eval, steps,
        train_samples_per_s, input_wait_fraction, wall_time_s, ...
    Raises:
        NonFiniteLoss: a non-finite step with `train.on_nan: stop`.
    """
    tc = setup.cfg.train
    spe, total, batch = setup.steps_per_epoch, setup.total_steps, setup.batch_size
    state = setup.state
    pending: _Interval | None = None
    last_log = start_step
    final_eval: dict[str, float] | None = None
    eval_step = -1
    eval_time = ckpt_time = 0.0
    ckpt_saves = 0
    steady_t0, steady_step, steady_wait0 = None, 0, 0.0
    preempted: str | None = None
    writer.start(total, description)
    wall0 = last_flush = time.perf_counter()

    def emit(iv: _Interval) -> None:
        sums = jax.device_get(iv.sums)
        if sums["skipped"] and tc.on_nan == "stop":
            raise _nonfinite(setup, state, checkpointer)
        loss, acc = _rates(sums)
        per_s = iv.steps / iv.seconds if iv.seconds > 0 else float("nan")
        # fp16 loss scaling: steps skipped because the scaled gradients overflowed.
        overflow = (
            {"overflow": int(sums["overflow"])} if setup.cfg.precision.compute == "fp16" else {}
        )
        writer.write(
            {
                "event": "train",
                "step": iv.step,
                "epoch": (iv.step - 1) // spe + 1,
                "loss": loss if sums["count"] else float("nan"),
                "accuracy": acc if sums["count"] else float("nan"),
                "lr": float(sums["lr"]),
                "skipped": int(sums["skipped"]),
                **overflow,
                "steps_per_s": per_s,
                "samples_per_s": per_s * batch,
                "time_s": time.perf_counter() - wall0,
            }
        )

    done = start_step
    in_flight: deque[Any] = deque()
    with setup.make_feed(start_step, total) as batches:
        for step in range(start_step, total):
            state, out = setup.train_step(state, next(batches))
            done = step + 1
            bound_in_flight(in_flight, out)
            if steady_t0 is None:
                # One sync after the first step: throughput is measured from here on.
                jax.block_until_ready(state.step)
                steady_t0, steady_step = time.perf_counter(), done
                steady_wait0 = batches.wait_time_s
            if done % tc.log_every == 0 or done == total:
                state, sums = setup.take_sums(state)
                now = time.perf_counter()
                if pending is not None:
                    emit(pending)
                pending = _Interval(done, done - last_log, sums, now - last_flush)
                last_log, last_flush = done, now
            eval_due = done % tc.eval_every == 0 if tc.eval_every else done % spe == 0
            if eval_due or done == total:
                # Evaluation needs this state anyway; waiting for it here keeps the queued train
                # steps out of the eval time that is subtracted from the throughput.
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                state, final_eval = evaluate(setup, state)
                eval_step = done
                writer.write(
                    {"event": "eval", "step": done, "epoch": (done - 1) // spe + 1, **final_eval}
                )
                eval_time += time.perf_counter() - t0
                last_flush += time.perf_counter() - t0
            # A signal during the last step changes nothing: the run completes normally.
            preempted = _preemption(guard, done, total, tc.log_every)
            if checkpointer is not None and (preempted or checkpointer.due(done)):
                # As for evaluation: queued train steps finish first, outside the timed wait.
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                # Flush the metrics up to here first: a run killed after this checkpoint has
                # them all on disk, and its resumed run logs the rest.
                if pending is not None:
                    emit(pending)
                    pending = None
                if int(jax.device_get(state.first_skipped)) >= 0 and tc.on_nan == "stop":
                    raise _nonfinite(setup, state, checkpointer)
                evals = final_eval if eval_step == done else None
                checkpointer.save(done, state, _meta(setup, done, evals), eval_metrics=evals)
                ckpt_time += time.perf_counter() - t0  # not training time either
                ckpt_saves += 1
                last_flush += time.perf_counter() - t0
            if preempted:
                break
        jax.block_until_ready(state)
        end = time.perf_counter()
        wait_total = batches.wait_time_s
    if pending is not None:
        emit(pending)
    if preempted:
        saved = checkpointer.path_of(done) if checkpointer is not None else None
        writer.write(
            {
                "event": "preempted",
                "step": done,
                "signal": preempted,
                "checkpoint": str(saved) if saved else None,
            }
        )
    writer.close()

    if final_eval is None and not preempted:
        # Resumed from the last step's checkpoint (killed before its summary): nothing is left
        # to train, but the summary needs the final evaluation.
        state, final_eval = evaluate(setup, state, update_plateau=False)
        eval_step = done
    if steady_t0 is None:
        steady_t0, steady_step = end, done
    steady_s = end - steady_t0 - eval_time - ckpt_time
    steady_steps = done - steady_step
    train_s = end - wall0 - eval_time - ckpt_time
    samples_per_s = (
        steady_steps * batch / steady_s
        if steady_steps and steady_s > 0
        else ((done - start_step) * batch / train_s)
    )
    setup.state = state
    return {
        "status": "preempted" if preempted else "completed",
        "signal": preempted,
        "final_eval": final_eval,
        "final_eval_step": eval_step if eval_step >= 0 else None,
        "start_step": start_step,
        "train_samples_per_s": samples_per_s,
        **_describe(setup, state, checkpointer, done),
        "compile_time_s": setup.compile_time_s,
        "wall_time_s": end - wall0,
        "eval_time_s": eval_time,
        # What the loop waited for checkpoints (with async: the copy off the devices only).
        "checkpoint_time_s": ckpt_time,
        "checkpoints_saved": ckpt_saves,
        "input_wait_s": wait_total,
        "input_wait_fraction": wait_total / train_s if train_s > 0 else 0.0,
        "steady_input_wait_fraction": (wait_total - steady_wait0) / steady_s
        if steady_s > 0
        else 0.0,
        "traces": dict(setup.traces),
    }
