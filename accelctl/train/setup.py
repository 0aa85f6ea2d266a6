"""Everything a run needs before its first step: mesh, data, state, compiled steps.

The state is initialised by `jax.jit(init, out_shardings=...)` from `jax.eval_shape`, so every
array is created directly with its final sharding; the train step is compiled ahead of time with
the real input shardings and donated state, and that compile is timed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from accelctl import data, models, optim, parallel, precision
from accelctl.config import Config
from accelctl.data import Dataset, Split
from accelctl.errors import FieldError
from accelctl.train.state import TRAIN_SUM_KEYS, TrainState, zero_sums
from accelctl.train.step import (
    StepConfig,
    make_cached_train_step,
    make_eval_step,
    make_plateau_step,
    make_take_sums,
    make_train_step,
)


@dataclass
class Setup:
    """A ready-to-run training job."""

    cfg: Config
    mesh: Mesh
    dataset: Dataset
    batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    total_steps: int
    state: TrainState
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    take_sums: Callable[..., Any]
    zero_eval_sums: Callable[[], Any]
    plateau_step: Callable[..., Any] | None
    put_fn: Callable[[data.HostBatch], Any]  # eval batches (and train batches except under pmap)
    compile_time_s: float
    num_params: int
    cache_mode: str  # where the training split lives: device, host or none (streamed)
    cache_reason: str
    device_cache: dict[str, jax.Array] | None = None
    traces: dict[str, int] = field(default_factory=dict)
    train_jit: Any = None  # the jitted (not compiled) train step, to lower for other shapes
    abstract_feed: Any = None  # what train_step was compiled for (ShapeDtypeStructs)
    strategy: str = "dp"  # parallel.strategy with auto resolved
    strategy_reason: str = ""
    train_put_fn: Callable[[data.HostBatch], Any] | None = None  # host train batches

    def make_feed(self, start_step: int, num_steps: int) -> AbstractContextManager[Iterator[Any]]:
        """Return the iterator of train-step inputs for steps [start_step, num_steps).

        Host modes: a `Prefetcher` of sharded batches; device cache: a `DeviceFeed`. Both have
        `wait_time_s` (time the loop waited for input) and are context managers.
        """
        tc = self.cfg.train
        if self.device_cache is not None:
            return data.DeviceFeed(
                self.device_cache,
                self.mesh,
                num_examples=len(self.dataset.train),
                batch_size=self.batch_size,
                seed=tc.seed,
                start_step=start_step,
                num_steps=num_steps,
            )
        host_batches = data.train_batches(
            self.dataset.train,
            self.batch_size,
            seed=tc.seed,
            start_step=start_step,
            num_steps=num_steps,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        put = self.train_put_fn or self.put_fn
        return data.Prefetcher(host_batches, put, depth=self.cfg.data.prefetch)


def _counted(fn: Callable[..., Any], name: str, traces: dict[str, int]) -> Callable[..., Any]:
    """Wrap `fn` so each trace (compilation) is counted: a recompile shows as a count > 1."""

    def traced(*args: Any) -> Any:
        traces[name] = traces.get(name, 0) + 1
        return fn(*args)

    traced.__name__ = name
    return traced


def _check_sizes(cfg: Config, mesh: Mesh, ds: Dataset) -> tuple[int, int, int, int]:
    batch = cfg.train.batch_size
    eval_batch = cfg.train.eval_batch_size or batch
    parallel.check_batch_size(cfg, mesh, batch, "batch_size")
    parallel.check_batch_size(
        cfg, mesh, eval_batch, "eval_batch_size" if cfg.train.eval_batch_size else "batch_size"
    )
    k = cfg.optimizer.accumulate_steps
    if batch % (k * mesh.shape["data"]):
        raise cfg.error_at(
            ("optimizer", "accumulate_steps"),
            f"{k} micro-batches of a batch of {batch} do not each divide over the "
            f"{mesh.shape['data']} devices of the data axis; train.batch_size must be a multiple "
            f"of {k * mesh.shape['data']}",
        )
    steps_per_epoch = len(ds.train) // batch
    if steps_per_epoch == 0:
        raise cfg.error_at(
            ("train", "batch_size"),
            f"{batch} is larger than the {len(ds.train)} training examples; lower it",
        )
    total = cfg.train.steps or (cfg.train.epochs or 10) * steps_per_epoch
    return batch, eval_batch, steps_per_epoch, total


def _check_inputs(cfg: Config, ds: Dataset) -> None:
    shape = ds.input_shape
    transformer = cfg.model.name == "transformer"
    if ds.tokens and not transformer:
        raise cfg.error_at(
            ("model", "name"),
            f"{ds.name} holds token ids, which only the transformer model reads; set "
            "model.name: transformer",
        )
    if transformer and not ds.tokens:
        raise cfg.error_at(
            ("data", "source"),
            f"the transformer model reads token ids, but {ds.name} examples are not tokens; use "
            "data.source: tokens",
        )
    max_len = getattr(cfg.model, "max_len", None)
    if transformer and max_len is not None and shape[0] > max_len:
        raise cfg.error_at(
            ("data", "seq_len"),
            f"sequences of {shape[0]} tokens exceed model.max_len {max_len} (the positions the "
            "model has); lower data.seq_len or raise model.max_len",
        )
    if cfg.data.augment.enabled and len(shape) not in (2, 3):
        raise cfg.error_at(
            ("data", "augment"),
            f"augmentation needs images (H, W[, C]); {ds.name} examples have shape {shape}",
        )
    # Grayscale (H, W) images have one channel; otherwise the last axis holds the channels.
    channels = 1 if len(shape) == 2 else shape[-1]
    if cfg.data.mean is not None and len(cfg.data.mean) not in (1, channels):
        raise cfg.error_at(
            ("data", "mean"),
            f"{len(cfg.data.mean)} values, but {ds.name} examples of shape {shape} have "
            f"{channels} channel(s); give one value or one per channel",
        )


def _place_data(cfg: Config, mesh: Mesh, ds: Dataset) -> tuple[Dataset, str, str]:
    """Decide and apply the cache mode: decode streamed splits that are to be cached."""
    mode, reason = data.plan_cache(cfg.data.cache, ds.train, mesh)
    if cfg.parallel.strategy == "pmap" and mode == "device":
        if cfg.data.cache == "device":
            raise cfg.error_at(
                ("data", "cache"),
                "device caching gathers batches inside a jit step; strategy pmap feeds each "
                "device its rows from the host: use cache: host or auto",
            )
        mode, reason = "host", "strategy pmap feeds batches from the host"
    train, ev = ds.train, ds.eval
    if mode in ("device", "host") and not isinstance(train, Split):
        train = train.load()  # type: ignore[attr-defined]
    if mode != "none" and not isinstance(ev, Split):
        ev = ev.load()  # type: ignore[attr-defined]
    return dataclasses.replace(ds, train=train, eval=ev), mode, reason


def make_setup(cfg: Config, *, compile_train: bool = True) -> Setup:
    """Build the mesh, load the data, initialise the sharded state and compile the steps.

    Args:
        cfg: validated config.
        compile_train: compile the train step ahead of time (and time it); False leaves it to
            compile on first use (evaluation-only jobs never use it).
    Returns:
        Setup with the initial state on the devices and the compiled step functions.
    Raises:
        ConfigError / UserError: bad sizes for the devices, unreadable data.
    """
    mesh = parallel.make_mesh(cfg)
    try:
        ds = data.build(cfg.data)
    except FieldError as e:
        raise cfg.error_at(e.path, e.message) from None
    batch, eval_batch, steps_per_epoch, total = _check_sizes(cfg, mesh, ds)
    _check_inputs(cfg, ds)
    ds, cache_mode, cache_reason = _place_data(cfg, mesh, ds)
    opt = optim.build(cfg.optimizer, cfg.schedule, total)

    dtype = precision.compute_dtype(cfg.precision)

    def make_model(key: jax.Array) -> nnx.Module:
        return models.build(
            cfg.model, ds.input_shape, ds.num_classes, rngs=nnx.Rngs(params=key), dtype=dtype
        )

    abstract_model = nnx.eval_shape(lambda: make_model(jax.random.key(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init() -> TrainState:
        root = jax.random.key(cfg.train.seed)
        param_key, dropout_key = jax.random.split(root)
        _, params, model_state = nnx.split(make_model(param_key), nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=opt.tx.init(params),
            rng=dropout_key,
            plateau=opt.plateau.init(params) if opt.plateau is not None else None,
            sums=zero_sums(TRAIN_SUM_KEYS),
            skipped=jnp.zeros((), jnp.int32),
            first_skipped=jnp.full((), -1, jnp.int32),
            loss_scale=precision.init_loss_scale(cfg.precision),
        )

    abstract_state = jax.eval_shape(init)
    strategy, strategy_reason = parallel.resolve_strategy(cfg, mesh, abstract_state)
    state_sh = parallel.state_shardings(mesh, abstract_state, strategy)
    state = jax.jit(init, out_shardings=state_sh)()
    num_params = sum(int(x.size) for x in jax.tree.leaves(state.params))

    sc = StepConfig(
        graphdef=graphdef,
        optimizer=opt,
        loss=cfg.train.loss,
        label_smoothing=cfg.train.label_smoothing,
        x_scale=ds.x_scale,
        token_inputs=ds.tokens,
        x_mean=cfg.data.mean,
        x_std=cfg.data.std,
        crop_padding=cfg.data.augment.crop_padding,
        flip=cfg.data.augment.flip,
        accumulate_steps=cfg.optimizer.accumulate_steps,
        micro_sharding=None if strategy == "pmap" else parallel.micro_batch_sharding(mesh),
        axis_name="data" if strategy == "pmap" else None,
    )
    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    traces: dict[str, int] = {}
    step_fn = make_train_step(sc)
    train_put_fn = None
    device_cache = None
    if cache_mode == "device":
        assert isinstance(ds.train, Split)
        device_cache = data.place_split(ds.train, mesh)
        step_fn = make_cached_train_step(step_fn, data.make_gather(mesh), steps_per_epoch)
        feed_sh: Any = {"cache": {"x": batch_sh, "y": batch_sh}, "idx": repl}
        abstract_feed: Any = {
            "cache": device_cache,
            "idx": jax.ShapeDtypeStruct((steps_per_epoch, batch), jnp.int32, sharding=repl),
        }
    else:
        feed_sh = batch_sh
        # pmap steps take one row of the batch per device: (devices, B / devices, ...).
        lead = (mesh.size, batch // mesh.size) if strategy == "pmap" else (batch,)
        y_shape = ds.train.example_shape if ds.tokens else ()
        abstract_feed = {
            "x": jax.ShapeDtypeStruct(
                (*lead, *ds.input_shape), ds.train.x_dtype, sharding=batch_sh
            ),
            "y": jax.ShapeDtypeStruct((*lead, *y_shape), jnp.int32, sharding=batch_sh),
        }
    if strategy == "pmap":
        train_jit = jax.pmap(
            _counted(step_fn, "train_step", traces),
            axis_name="data",
            in_axes=(None, 0),
            out_axes=(None, None),
            donate_argnums=0,
            devices=list(mesh.devices.flat),
        )
        train_put_fn = data.make_put_fn(batch_sh, per_device=mesh.size)
    else:
        train_jit = jax.jit(
            _counted(step_fn, "train_step", traces),
            in_shardings=(state_sh, feed_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )
    t0 = time.perf_counter()
    train_step = train_jit.lower(state, abstract_feed).compile() if compile_train else train_jit
    compile_time_s = time.perf_counter() - t0 if compile_train else 0.0

    eval_step = jax.jit(
        _counted(make_eval_step(sc), "eval_step", traces),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=repl,
    )
    take_sums = jax.jit(
        _counted(make_take_sums(sc), "take_sums", traces),
        in_shardings=(state_sh,),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    plateau_step = None
    if opt.plateau is not None and opt.plateau_monitor == "eval_loss":
        plateau_step = jax.jit(
            make_plateau_step(sc),
            in_shardings=(state_sh, repl),
            out_shardings=state_sh,
            donate_argnums=0,
        )
    return Setup(
        cfg=cfg,
        mesh=mesh,
        dataset=ds,
        batch_size=batch,
        eval_batch_size=eval_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        state=state,
        train_step=train_step,
        eval_step=eval_step,
        take_sums=take_sums,
        zero_eval_sums=jax.jit(zero_sums, out_shardings=repl),
        plateau_step=plateau_step,
        put_fn=data.make_put_fn(batch_sh),
        compile_time_s=compile_time_s,
        num_params=num_params,
        cache_mode=cache_mode,
        cache_reason=cache_reason,
        device_cache=device_cache,
        traces=traces,
        train_jit=train_jit,
        abstract_feed=abstract_feed,
        strategy=strategy,
        strategy_reason=strategy_reason,
        train_put_fn=train_put_fn,
    )
