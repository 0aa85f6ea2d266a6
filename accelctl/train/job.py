"""Everything a run needs before its first step, as small frozen pieces: the mesh, the sizes,
the data feed, the abstract state and the compiled steps.

`build_job(cfg)` reads like the data flow of DESIGN.md: mesh → data → model and optimizer →
abstract state (+ shardings) → steps compiled ahead of time for those shardings. No train state
exists yet: the caller initialises it (`job.state.init()`) or restores a checkpoint into
`job.state.abstract`, never both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from accelctl import data, memory, models, optim, parallel, precision
from accelctl.config import Config, ConfigError
from accelctl.config.base import INT32_MAX
from accelctl.config.model import CustomModelConfig
from accelctl.data import Dataset, Split
from accelctl.errors import FieldError
from accelctl.models import custom
from accelctl.train import losses
from accelctl.train.feed import DataFeed
from accelctl.train.state import StateSpec, make_state_spec
from accelctl.train.step import StepConfig, _forward
from accelctl.train.steps import Steps, compile_steps


@dataclass(frozen=True)
class Sizes:
    """Batch sizes and run length, checked against the devices and the data."""

    batch: int  # global, per update
    eval_batch: int
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class Job:
    """A ready-to-run training (or evaluation) job; immutable."""

    cfg: Config
    mesh: Mesh
    sizes: Sizes
    feed: DataFeed
    state: StateSpec
    steps: Steps

    @property
    def dataset(self) -> Dataset:
        return self.feed.dataset


def check_sizes(cfg: Config, mesh: Mesh, ds: Dataset) -> Sizes:
    """The run's sizes, or a located ConfigError when a batch does not fit the devices/data."""
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
    if total > INT32_MAX:  # the step counter on the devices is int32
        raise cfg.error_at(
            ("train", "epochs"),
            f"{cfg.train.epochs} epochs of {steps_per_epoch} steps are {total:,} steps, more than "
            f"the {INT32_MAX:,} a run can count; lower train.epochs",
        )
    return Sizes(batch, eval_batch, steps_per_epoch, total)


def check_inputs(cfg: Config, ds: Dataset) -> None:
    """Located ConfigErrors for a model/data mismatch found before anything is compiled.

    A user's model (`model.target`) may read any data; its logits are checked against the data
    (per-position for token data) once it is built (`build_job`).
    """
    shape = ds.input_shape
    transformer = cfg.model.name == "transformer"
    if ds.tokens and cfg.model.name not in ("transformer", "custom"):
        raise cfg.error_at(
            ("model", "name"),
            f"{ds.name} holds token ids, which only the transformer model reads; set "
            "model.name: transformer, or use your own model (model.target) that returns "
            "per-position logits",
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
    """Decide and apply the cache mode: decode streamed splits that are to be cached.

    Streamed splits are wrapped so that a bad row found while reading a batch (in the prefetch
    thread, mid-run) is reported at its config field's file:line like a load-time error.
    """

    def locate(e: FieldError) -> ConfigError:
        return cfg.error_at(e.path, e.message)

    def streamed(split: data.SplitLike) -> data.SplitLike:
        return split if isinstance(split, Split) else data.LocatedSplit(split, locate)

    ds = dataclasses.replace(ds, train=streamed(ds.train), eval=streamed(ds.eval))
    try:
        mode, reason = data.plan_cache(cfg.data.cache, ds.train, mesh)
    except FieldError as e:
        raise locate(e) from None
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


def make_model_fn(
    cfg: Config, ds: Dataset, *, model: Any = None
) -> Callable[[jax.Array], nnx.Module]:
    """param_key -> the configured model, initialised from that key, in the compute dtype.

    Args:
        cfg: the config (`model`, `precision`).
        ds: the data (example shape, class count, token inputs).
        model: a user's model class or factory itself (`model.target` is then not imported).
    Returns:
        The function (called inside `jax.eval_shape` / `jax.jit` only).
    """
    dtype = precision.compute_dtype(cfg.precision)

    def make_model(key: jax.Array) -> nnx.Module:
        return models.build(
            cfg.model,
            ds.input_shape,
            ds.num_classes,
            rngs=nnx.Rngs(params=key),
            dtype=dtype,
            tokens=ds.tokens,
            obj=model,
        )

    return make_model


def _check_user_parts(cfg: Config, model: Any) -> None:
    """Import and check a user's model and loss (not build them) before any data is loaded."""
    if isinstance(cfg.model, CustomModelConfig):
        custom.resolve(cfg.model, obj=model)
    losses.check_loss(cfg.train.loss, cfg.train.label_smoothing)


def _check_outputs(cfg: Config, sc: StepConfig, spec: StateSpec, ds: Dataset, model: Any) -> None:
    """Run a user's model (and loss) abstractly on a batch of 2 of the data's shape: its logits
    must fit the labels, before the train step is compiled."""
    x = jax.ShapeDtypeStruct((2, *ds.input_shape), jnp.int32 if ds.tokens else jnp.float32)
    y = jax.ShapeDtypeStruct((2, ds.input_shape[0]) if ds.tokens else (2,), jnp.int32)
    # Shapes only: the shardings of the abstract state play no part here.
    params, model_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        (spec.abstract.params, spec.abstract.model_state),
    )
    if isinstance(cfg.model, CustomModelConfig):
        try:
            # _inputs casts x to float32 as the steps do; train=True with a dropout key is the
            # fuller path (evaluation differs only in the flag).
            logits, _ = jax.eval_shape(
                lambda p, s, x: _forward(sc, p, s, x, train=True, dropout_key=jax.random.key(0)),
                params,
                model_state,
                x,
            )
        except FieldError:
            raise
        except Exception as e:
            raise custom.forward_failed(cfg.model, e, x.shape, str(x.dtype), model) from None
        custom.check_logits(
            logits,
            num_classes=ds.num_classes,
            tokens=ds.tokens,
            input_shape=ds.input_shape,
            cfg=cfg.model,
            obj=model,
        )
    else:  # what the built-in models return
        logits = jax.ShapeDtypeStruct((*y.shape, ds.num_classes), jnp.float32)
    losses.check_loss_output(cfg.train.loss, jax.ShapeDtypeStruct(logits.shape, jnp.float32), y)


def build_job(
    cfg: Config,
    *,
    compile_train: bool = True,
    model: Any = None,
    data_source: Any = None,
    dataset: Dataset | None = None,
) -> Job:
    """Build the mesh, load the data, describe the state and compile the steps.

    Args:
        cfg: validated config.
        compile_train: compile the train step ahead of time (and time it); False leaves it to
            compile on first use (evaluation-only jobs never use it).
        model: with a user's model (`model.target`), its class or factory itself instead of
            importing the target (the Python API); None imports it.
        data_source: with `data.source: python`, the loader itself or what it returns, instead
            of importing `data.target` (the Python API's `data=`); None imports it.
        dataset: the data set to use instead of building it from `cfg.data`: `accelctl plan`
            passes one described by its shapes alone. It is fed from the host (cache mode host)
            and nothing of it is read or placed on the devices.
    Returns:
        The Job; no train state exists yet.
    Raises:
        ConfigError / UserError: bad sizes for the devices, unreadable data, a model that
            does not fit the data; a user's model or loss that cannot be imported or built, or
            whose logits do not fit the labels (located at model.target / model.args /
            train.loss, before anything is compiled); an eval batch larger than the host
            memory (located at train.eval_batch_size).
        OutOfMemory: (not with `dataset`) the train state, or the compiled train or eval
            step, cannot fit the devices' memory (accelctl.memory), before any is allocated.
    """
    mesh = parallel.make_mesh(cfg)
    models.check_backend(cfg, mesh.devices.flat[0])  # before any data is read
    with _located(cfg):
        _check_user_parts(cfg, model)
        ds = data.build(cfg.data, obj=data_source) if dataset is None else dataset
    sizes = check_sizes(cfg, mesh, ds)
    check_inputs(cfg, ds)
    if dataset is None:
        with _located(cfg):
            memory.check_eval_batch(
                cfg, ds, sizes.eval_batch, mesh.shape["data"], jax.process_count()
            )
        ds, cache_mode, cache_reason = _place_data(cfg, mesh, ds)
    else:
        cache_mode, cache_reason = "host", "a data set given by its shapes (nothing placed)"
    opt = optim.build(cfg.optimizer, cfg.schedule, sizes.total_steps)
    with _located(cfg):
        spec = make_state_spec(cfg, mesh, make_model_fn(cfg, ds, model=model), opt)
    if dataset is None:  # a plan (given shapes) reports what does not fit instead
        memory.check_state(spec, mesh, eval_only=not compile_train)
    sc = _step_config(cfg, spec, ds, opt, mesh)
    with _located(cfg):
        _check_outputs(cfg, sc, spec, ds, model)
    feed = DataFeed.make(
        ds, mesh, sizes.batch, cache_mode, cache_reason, pmap=sc.axis_name is not None
    )
    steps = compile_steps(sc, spec, feed, mesh, sizes, compile_train=compile_train)
    job = Job(cfg=cfg, mesh=mesh, sizes=sizes, feed=feed, state=spec, steps=steps)
    if dataset is None and compile_train:
        memory.check_step(job, model=model)  # before the first step, from XLA's analysis
    return job


@contextlib.contextmanager
def _located(cfg: Config) -> Iterator[None]:
    """A FieldError raised inside becomes a ConfigError located at its field's line."""
    try:
        yield
    except FieldError as e:
        raise cfg.error_at(e.path, e.message) from None


def _step_config(cfg: Config, spec: StateSpec, ds: Dataset, opt: Any, mesh: Mesh) -> StepConfig:
    """What the pure steps need to know, from the config, the state and the data."""
    pmap = spec.strategy == "pmap"
    call_rngs = True
    if isinstance(cfg.model, CustomModelConfig):
        with _located(cfg):
            abstract_model = nnx.merge(
                spec.graphdef, spec.abstract.params, spec.abstract.model_state
            )
            call_rngs = custom.call_takes_rngs(abstract_model)
    return StepConfig(
        graphdef=spec.graphdef,
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
        micro_sharding=None if pmap else parallel.micro_batch_sharding(mesh),
        axis_name="data" if pmap else None,
        call_rngs=call_rngs,
        remat=models.forward_remat(cfg.model),
    )
