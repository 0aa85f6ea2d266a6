"""The compiled steps against the devices' memory, before the first step: XLA's memory analysis
of the train step (and of the eval step when it may not fit); when the train step does not fit,
changes are planned again (compiled for abstract inputs, nothing allocated) until one fits."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from accelctl.errors import OutOfMemory
from accelctl.memory.device import WAYS_OUT, Budget, device_budget, shard_bytes
from accelctl.memory.host import eval_row_bytes, format_bytes, show_bytes

# Re-planning changes for a train step that does not fit stops once this many seconds are spent
# (a change is only tried while its compile, timed like the first, still fits in the time left).
REMEDY_SEARCH_S = 60.0


def _device_cache_bytes(job: Any) -> int:
    cache = job.feed.device_cache
    return shard_bytes(cache) if cache is not None else 0


def check_step(job: Any, *, model: Any = None) -> None:
    """Refuse, before the first step, a compiled train (or eval) step the devices cannot hold.

    Args:
        job: a built job whose train step is compiled (`job.steps.train.memory_analysis()`).
        model: the user's model object the job was built with (re-planning builds it again).
    Raises:
        OutOfMemory: with the bytes needed (XLA's memory analysis) and available, and a change
            re-planned to fit when one was found within REMEDY_SEARCH_S, else the ways out.
    """
    from accelctl.plan import compiled_memory

    budget = device_budget(job.mesh)
    if budget.per_device is None:
        return
    mem = compiled_memory(job.steps.train, None)
    cache = _device_cache_bytes(job)
    # On shared devices the device-cached split is in host memory already (not available).
    capacity = budget.per_device + (cache if budget.shared else 0)
    need = int(mem["total_bytes"] or 0)
    if need > capacity:
        raise _step_error(job, budget, mem, capacity, cache, model)
    _check_eval_step(job, budget, mem, capacity, cache)


def _step_error(
    job: Any, budget: Budget, mem: dict[str, Any], capacity: int, cache: int, model: Any
) -> OutOfMemory:
    """The error for a train step that does not fit, with a change that does if one is found."""
    need = int(mem["total_bytes"])
    found, tried = find_remedy(job, mem, capacity, cache, model=model)
    if found is not None:
        change = ", ".join(f"{k}: {v}" for k, v in found["change"].items())
        verdict = (
            f"Planned again (compiled, nothing allocated): with {change} the step needs "
            f"{show_bytes(found['need_bytes'])} per device and fits."
        )
        # Accumulation shrinks the train step's micro-batch only; evaluation keeps its batch.
        if "optimizer.accumulate_steps" in found["change"] and not job.cfg.train.eval_batch_size:
            verdict += (
                f" Evaluation uses the same batch of {job.sizes.batch:,}: lower "
                "train.eval_batch_size too if it does not fit."
            )
    elif tried:
        verdict = f"None of the changes planned again fits ({'; '.join(tried)})."
    else:
        verdict = ""
    analysis = (
        f"XLA's memory analysis of the compiled step: arguments "
        f"{format_bytes(mem['argument_bytes'])}, outputs {format_bytes(mem['output_bytes'])} "
        f"({format_bytes(mem['alias_bytes'])} of them in donated buffers), temporaries "
        f"{format_bytes(mem['temp_bytes'])}"
    )
    if cache and budget.shared:
        analysis += f"; the device-cached data, {format_bytes(cache)}, is in memory already"
    parts = [
        f"the train step needs {budget.need_text(need)} ({analysis}), more than "
        f"{budget.available_text()}; nothing was run.",
        verdict,
        f"Ways out: {WAYS_OUT}.",
    ]
    return OutOfMemory(" ".join(p for p in parts if p))


def _shape_dataset(ds: Any) -> Any:
    """`ds` described by its shapes alone (plan.ShapeSplit): re-planning reads no data."""
    from accelctl.plan import ShapeSplit

    def shaped(split: Any) -> ShapeSplit:
        y_shape = tuple(split.example_shape) if ds.tokens else ()
        return ShapeSplit(len(split), tuple(split.example_shape), split.x_dtype, y_shape)

    return dataclasses.replace(ds, train=shaped(ds.train), eval=shaped(ds.eval))


def _replan(job: Any, change: dict[str, Any], model: Any) -> tuple[int | None, str | None]:
    """Per-device bytes of the job's train step with `change` applied (compiled for abstract
    inputs, as `accelctl plan` does; nothing allocated), or (None, why it could not be)."""
    from accelctl import config as config_mod
    from accelctl import plan
    from accelctl.train.job import build_job

    try:
        cfg = config_mod.replace(job.cfg, change)
        shaped = build_job(
            cfg, compile_train=False, model=model, dataset=_shape_dataset(job.dataset)
        )
        compiled = plan.compile_train_step(shaped)
    except Exception as e:  # noqa: BLE001 - a change this config cannot take is not a remedy
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    return int(plan.compiled_memory(compiled, None)["total_bytes"] or 0), None


def _candidates(job: Any, mem: dict[str, Any], capacity: int, cache: int) -> Iterator[dict]:
    """Changes to plan again, most likely to fit first (`plan.remedies`, ordered by estimate).

    The step's bytes are split into a fixed part (the state, the gradients, the cached data)
    and the rest, taken to scale with the (micro-)batch: gradient accumulation is tried at the
    fewest micro-batches estimated to fit (and twice that), fsdp, remat, then the largest
    smaller batch estimated to fit (and half that). Every estimate is checked by compiling.
    """
    from accelctl.plan import remedies

    cfg, spec, sizes = job.cfg, job.state, job.sizes
    axis = int(job.mesh.shape["data"])
    row = {"batch_size": sizes.batch, "mesh": {"data": axis}, "strategy": spec.strategy}
    options = remedies(cfg, row)
    params = shard_bytes(spec.abstract.params)
    fixed = shard_bytes(spec.abstract) + params + cache
    variable = max(int(mem["total_bytes"]) - fixed, 1)
    k0 = cfg.optimizer.accumulate_steps
    room = capacity - fixed - params  # an accumulation buffer of the gradients' size
    ks = [o["optimizer.accumulate_steps"] for o in options if "optimizer.accumulate_steps" in o]
    fitting = [k for k in ks if room > 0 and variable * k0 / k <= room]
    if fitting:
        i = ks.index(fitting[0])
        for k in ks[i : i + 2]:
            yield {"optimizer.accumulate_steps": k}
    for option in options:
        if "optimizer.accumulate_steps" not in option:
            yield option
    unit = axis * k0
    if capacity - fixed > 0:
        batch = int(sizes.batch * (capacity - fixed) / variable) // unit * unit
        for b in (batch, batch // 2 // unit * unit):
            if unit <= b < sizes.batch:
                yield {"train.batch_size": b}


def find_remedy(
    job: Any,
    mem: dict[str, Any],
    capacity: int,
    cache: int,
    *,
    model: Any = None,
    budget_s: float = REMEDY_SEARCH_S,
) -> tuple[dict[str, Any] | None, list[str]]:
    """The first change that makes the train step fit `capacity` bytes per device.

    Each candidate is planned again (compiled, nothing allocated) while its compile, timed like
    the job's own, fits in what is left of `budget_s`.

    Returns:
        ({"change", "need_bytes"} or None, one line per change tried that did not fit).
    """
    t0, compile_s = time.monotonic(), job.steps.compile_time_s
    tried: list[str] = []
    for change in _candidates(job, mem, capacity, cache):
        if time.monotonic() - t0 + compile_s > budget_s:
            tried.append(f"stopped after {time.monotonic() - t0:.0f} s")
            break
        need, why = _replan(job, change, model)
        text = ", ".join(f"{k}: {v}" for k, v in change.items())
        if need is None:
            tried.append(f"{text}: {why}")
            continue
        need += cache
        if need <= capacity:
            return {"change": change, "need_bytes": need}, tried
        tried.append(f"{text}: {format_bytes(need)}")
    return None, tried


def _abstract_eval_inputs(job: Any) -> tuple[Any, ...]:
    """Abstract (params, model_state, eval batch, sums) of the eval step, with shardings."""
    import jax
    import jax.numpy as jnp

    from accelctl import parallel

    ds, batch = job.dataset, job.sizes.eval_batch
    sh = parallel.batch_sharding(job.mesh)
    y_shape = ds.input_shape if ds.tokens else ()
    inputs = {
        "x": jax.ShapeDtypeStruct((batch, *ds.input_shape), ds.train.x_dtype, sharding=sh),
        "y": jax.ShapeDtypeStruct((batch, *y_shape), jnp.int32, sharding=sh),
        "mask": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=sh),
    }
    repl = parallel.replicated(job.mesh)
    sums = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
        jax.eval_shape(job.steps.zero_eval_sums),
    )
    spec = job.state.abstract
    return spec.params, spec.model_state, inputs, sums


def _check_eval_step(
    job: Any, budget: Budget, train_mem: dict[str, Any], capacity: int, cache: int
) -> None:
    """Refuse an eval batch the devices cannot hold beside the train state.

    Evaluation keeps less per example than training (no backward pass), so the train step's
    temporaries per example make a (rough) bound: only when that bound does not fit is the eval
    step compiled (for abstract inputs) and its own analysis compared. What slips through is
    still reported at run time (`out_of_memory`).
    """
    from accelctl.plan import compiled_memory

    axis = int(job.mesh.shape["data"])
    eval_rows = -(-job.sizes.eval_batch // axis)
    train_rows = max(job.sizes.batch // axis // job.cfg.optimizer.accumulate_steps, 1)
    x, y = eval_row_bytes(job.dataset)
    state = shard_bytes(job.state.abstract)
    bound = state + cache + eval_rows * (int(train_mem["temp_bytes"]) // train_rows + x + y + 4)
    if bound <= capacity:
        return
    # jit keeps this trace: the first real evaluation of this shape does not trace again.
    compiled = job.steps.eval.lower(*_abstract_eval_inputs(job)).compile()
    mem = compiled_memory(compiled, None)
    abstract = job.state.abstract
    held = state - shard_bytes(abstract.params) - shard_bytes(abstract.model_state)
    need = int(mem["total_bytes"] or 0) + held + cache
    if need <= capacity:
        return
    fixed = held + cache + int(mem["argument_bytes"]) - eval_rows * (x + y + 4)
    per_row = max((need - fixed) / eval_rows, 1.0)
    fits = int((capacity - fixed) / per_row) * axis if capacity > fixed else 0
    hint = (
        f"about {fits:,} examples fit (a multiple of the {axis} devices of the data axis)"
        if fits >= axis
        else "not even one example per device fits beside the train state"
    )
    raise OutOfMemory(
        f"evaluation needs {budget.need_text(need)} (an eval batch of "
        f"{job.sizes.eval_batch:,}: XLA's memory analysis of the compiled eval step, "
        f"{format_bytes(int(mem['total_bytes']))}, beside the rest of the train state, "
        f"{format_bytes(held)}), more than {budget.available_text()}; nothing was run. Lower "
        f"train.eval_batch_size: {hint}; parallel.strategy: fsdp also shards the parameters "
        "over the devices of the data axis."
    )
