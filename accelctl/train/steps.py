"""The compiled step functions of a job, built for the state's and the feed's shardings.

The train step is compiled ahead of time from abstract inputs (no state needs to exist) with
donated state, and that compile is timed; the others compile on first use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh

from accelctl import data, parallel
from accelctl.train.state import StateSpec, zero_sums
from accelctl.train.step import (
    StepConfig,
    make_cached_train_step,
    make_eval_step,
    make_plateau_step,
    make_take_sums,
    make_train_step,
)

if TYPE_CHECKING:
    from accelctl.train.feed import DataFeed
    from accelctl.train.job import Sizes


@dataclass(frozen=True)
class Steps:
    """The step functions.

    Attributes:
        train: (state, input) -> (state, {"loss"}); compiled, or jitted when not compiled yet.
        train_jit: the jitted (not compiled) train step, to lower for other input shapes.
        eval: (params, model_state, batch, sums) -> sums.
        take_sums: state -> (state with zeroed sums, sums + lr).
        zero_eval_sums: () -> fresh eval sums.
        plateau: (state, eval_sums) -> state, when ReduceLROnPlateau watches the eval loss.
        compile_time_s: the train step's ahead-of-time compile (0 when not compiled).
        traces: how often each step function was traced (1 = no recompiles); filled as they
            compile.
    """

    train: Callable[..., Any]
    train_jit: Any
    eval: Callable[..., Any]
    take_sums: Callable[..., Any]
    zero_eval_sums: Callable[[], Any]
    plateau: Callable[..., Any] | None
    compile_time_s: float
    traces: dict[str, int] = field(default_factory=dict)


def _counted(fn: Callable[..., Any], name: str, traces: dict[str, int]) -> Callable[..., Any]:
    """Wrap `fn` so each trace (compilation) is counted: a recompile shows as a count > 1."""

    def traced(*args: Any) -> Any:
        traces[name] = traces.get(name, 0) + 1
        return fn(*args)

    traced.__name__ = name
    return traced


def _jit_train(
    step_fn: Callable[..., Any], spec: StateSpec, feed: DataFeed, mesh: Mesh, traces: dict
) -> Any:
    counted = _counted(step_fn, "train_step", traces)
    if spec.strategy == "pmap":
        return jax.pmap(
            counted,
            axis_name="data",
            in_axes=(None, 0),
            out_axes=(None, None),
            donate_argnums=0,
            devices=list(mesh.devices.flat),
        )
    return jax.jit(
        counted,
        in_shardings=(spec.shardings, feed.input_shardings),
        out_shardings=(spec.shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def compile_steps(
    sc: StepConfig,
    spec: StateSpec,
    feed: DataFeed,
    mesh: Mesh,
    sizes: Sizes,
    *,
    compile_train: bool = True,
) -> Steps:
    """Jit every step for the state's and the feed's shardings; compile the train step now.

    Args:
        sc: what the steps need besides the state.
        spec: the abstract state and its shardings.
        feed: the train step's input layout.
        mesh: the device mesh.
        sizes: steps per epoch (the device-cached feed indexes its epoch table by step).
        compile_train: False leaves the train step to compile on first use.
    """
    traces: dict[str, int] = {}
    step_fn = make_train_step(sc)
    if feed.device_cache is not None:
        step_fn = make_cached_train_step(step_fn, data.make_gather(mesh), sizes.steps_per_epoch)
    train_jit = _jit_train(step_fn, spec, feed, mesh, traces)
    t0 = time.perf_counter()
    train = (
        train_jit.lower(spec.abstract, feed.abstract_input).compile()
        if compile_train
        else train_jit
    )
    compile_time_s = time.perf_counter() - t0 if compile_train else 0.0
    repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    sh = spec.shardings
    plateau = None
    if sc.optimizer.plateau is not None and sc.optimizer.plateau_monitor == "eval_loss":
        plateau = jax.jit(
            make_plateau_step(sc), in_shardings=(sh, repl), out_shardings=sh, donate_argnums=0
        )
    return Steps(
        train=train,
        train_jit=train_jit,
        eval=jax.jit(
            _counted(make_eval_step(sc), "eval_step", traces),
            in_shardings=(sh.params, sh.model_state, batch_sh, repl),
            out_shardings=repl,
        ),
        take_sums=jax.jit(
            _counted(make_take_sums(sc), "take_sums", traces),
            in_shardings=(sh,),
            out_shardings=(sh, repl),
            donate_argnums=0,
        ),
        zero_eval_sums=jax.jit(zero_sums, out_shardings=repl),
        plateau=plateau,
        compile_time_s=compile_time_s,
        traces=traces,
    )
