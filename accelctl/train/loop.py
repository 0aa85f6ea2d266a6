"""The host loop: feed prefetched batches to the compiled step, read metrics one interval late.

The loop never waits on the device except (a) once after the first step, to start the
steady-state clock, (b) when it reads the *previous* interval's metric sums, by which time they
are long computed, and (c) at evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax

from accelctl import data
from accelctl.metrics import MetricWriter
from accelctl.train.setup import Setup
from accelctl.train.state import TrainState


@dataclass
class _Interval:
    step: int
    steps: int
    sums: Any  # device arrays, read later
    seconds: float


def _rates(sums: dict[str, float]) -> tuple[float, float]:
    count = max(float(sums["count"]), 1.0)
    return float(sums["loss_sum"]) / count, float(sums["correct"]) / count


def evaluate(setup: Setup, state: TrainState) -> tuple[TrainState, dict[str, float]]:
    """Run the eval split through the eval step; feed the plateau controller if it watches it.

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
    if setup.plateau_step is not None:
        state = setup.plateau_step(state, sums)
    host = jax.device_get(sums)
    loss, acc = _rates(host)
    return state, {"loss": loss, "accuracy": acc, "count": int(host["count"])}


def run(setup: Setup, writer: MetricWriter, *, description: str = "train") -> dict[str, Any]:
    """Train for `setup.total_steps` steps, evaluating and logging as configured.

    Args:
        setup: from `make_setup`.
        writer: receives train/eval events.
        description: label of the progress bar.
    Returns:
        Summary dict: final_eval, steps, train_samples_per_s, input_wait_fraction, wall_time_s, ...
    """
    tc = setup.cfg.train
    spe, total, batch = setup.steps_per_epoch, setup.total_steps, setup.batch_size
    state = setup.state
    pending: _Interval | None = None
    final_eval: dict[str, float] | None = None
    eval_time = 0.0
    steady_t0, steady_step, steady_wait0 = None, 0, 0.0
    writer.start(total, description)
    wall0 = last_flush = time.perf_counter()

    def emit(iv: _Interval) -> None:
        sums = jax.device_get(iv.sums)
        loss, acc = _rates(sums)
        per_s = iv.steps / iv.seconds if iv.seconds > 0 else float("nan")
        writer.write(
            {
                "event": "train",
                "step": iv.step,
                "epoch": (iv.step - 1) // spe + 1,
                "loss": loss,
                "accuracy": acc,
                "lr": float(sums["lr"]),
                "steps_per_s": per_s,
                "samples_per_s": per_s * batch,
                "time_s": time.perf_counter() - wall0,
            }
        )

    with setup.make_feed(0, total) as batches:
        for step in range(total):
            state, _ = setup.train_step(state, next(batches))
            done = step + 1
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
                steps_in = done - (pending.step if pending else 0)
                pending = _Interval(done, steps_in, sums, now - last_flush)
                last_flush = now
            eval_due = done % tc.eval_every == 0 if tc.eval_every else done % spe == 0
            if eval_due or done == total:
                # Evaluation needs this state anyway; waiting for it here keeps the queued train
                # steps out of the eval time that is subtracted from the throughput.
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                state, final_eval = evaluate(setup, state)
                writer.write(
                    {"event": "eval", "step": done, "epoch": (done - 1) // spe + 1, **final_eval}
                )
                eval_time += time.perf_counter() - t0
                last_flush += time.perf_counter() - t0
        jax.block_until_ready(state)
        end = time.perf_counter()
        wait_total = batches.wait_time_s
    if pending is not None:
        emit(pending)
    writer.close()

    assert final_eval is not None and steady_t0 is not None
    steady_s = end - steady_t0 - eval_time
    steady_steps = total - steady_step
    train_s = end - wall0 - eval_time
    samples_per_s = (
        steady_steps * batch / steady_s
        if steady_steps and steady_s > 0
        else (total * batch / train_s)
    )
    setup.state = state
    return {
        "final_eval": final_eval,
        "steps": total,
        "epochs": total / spe,
        "steps_per_epoch": spe,
        "global_batch_size": batch,
        "train_samples_per_s": samples_per_s,
        "devices": setup.mesh.devices.size,
        "device_kind": setup.mesh.devices.flat[0].device_kind,
        "platform": setup.mesh.devices.flat[0].platform,
        "mesh": dict(setup.mesh.shape),
        "processes": jax.process_count(),
        "num_params": setup.num_params,
        "data_cache": setup.cache_mode,
        # Where the input pipeline stands: a resumed run starts its data here.
        "data_position": data.DataPosition.at(total, steps_per_epoch=spe, seed=tc.seed).to_dict(),
        "compile_time_s": setup.compile_time_s,
        "wall_time_s": end - wall0,
        "eval_time_s": eval_time,
        "input_wait_s": wait_total,
        "input_wait_fraction": wait_total / train_s if train_s > 0 else 0.0,
        "steady_input_wait_fraction": (wait_total - steady_wait0) / steady_s
        if steady_s > 0
        else 0.0,
        "traces": dict(setup.traces),
    }
