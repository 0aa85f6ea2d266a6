"""`accelctl plan`: what one training step will need, known before anything runs.

The job is built from shapes alone: the data set's layout comes from the config where it says it
(synthetic images and tokens: nothing generated) or from the source otherwise (read on the host
only), `build_job(dataset=...)` describes the state abstractly, and the train step is compiled
ahead of time for the backend present. No parameter is allocated and nothing is placed on the
devices. From the compiled step it reports, per device: the bytes of the parameters, optimizer
state and inputs (their shard sizes), XLA's memory analysis (arguments, outputs, temporaries),
XLA's FLOPs and bytes accessed, the analytic model FLOPs of a transformer, a roofline estimate of
the step time, which attention kernel the step uses, and whether it all fits the device's memory.
When it does not, every remedy (remat, gradient accumulation, fsdp, a smaller batch) is planned
again, compiled like the first, until one fits.

`bench --find-max-batch` probes batch sizes with the same machinery (`max_batch.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from accelctl import config as config_mod
from accelctl.config import Config
from accelctl.errors import FieldError, UserError
from accelctl.memory.device import shard_bytes

if TYPE_CHECKING:
    from accelctl.data import Dataset

SCHEMA = "accelctl.plan/1"
CPU_NOTE = (
    "compiled for the CPU backend: a CPU plan is not a GPU plan (other kernels, fusions and "
    "memory layouts); plan on the machine that will train"
)
CUDNN_ATTENTION = "__cudnn$fmha"  # custom_call_target prefix of cuDNN's fused attention
MODEL_FLOPS_FORMULA = (
    "6*B*T*(L*(4*d^2 + 2*d*m) + d*V) + 6*L*B*T^2*d (matmuls only, causal attention halved; "
    "PaLM/MaxText)"
)


@dataclass(frozen=True)
class ShapeSplit:
    """A split known by its layout alone (`data.SplitLike` without data): nothing is generated
    or read, and `take` refuses.

    Attributes:
        length: examples.
        example_shape: one input x, e.g. (28, 28, 1) or (T,).
        x_dtype: the inputs' host dtype.
        y_shape: one target: () for a class label, (T,) for next-token targets (int32).
    """

    length: int
    example_shape: tuple[int, ...]
    x_dtype: np.dtype[Any]
    y_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        x = math.prod(self.example_shape) * self.x_dtype.itemsize
        return self.length * (x + 4 * math.prod(self.y_shape))

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("a split described by its shapes holds no data to take")


def describe_data(cfg: Config) -> tuple[Dataset, str]:
    """The data set as the train step sees it, without generating data where the config says
    its layout.

    Args:
        cfg: the config (`data`).
    Returns:
        (dataset, where its shapes came from): "config"; "source" when the source was opened on
        the host to learn them (files, a prepared tfds set's metadata, the user's loader); or
        "features" for a tfds set that is not prepared yet: its registered features give the
        shapes, and as its split sizes are unknown each split stands in as one batch.
    Raises:
        ConfigError: the source cannot be opened (located at its field).
    """
    from accelctl.data import Dataset

    d = cfg.data
    if d.source == "synthetic":
        dtype = np.dtype(d.dtype)
        shape = tuple(d.shape)
        # As data.sources.make_synthetic: uint8 pixels scaled by 1/255 on the device.
        scale = 1.0 / 255.0 if d.dtype == "uint8" else None
        splits = (ShapeSplit(n, shape, dtype) for n in (d.num_train, d.num_eval))
        return Dataset("synthetic", *splits, num_classes=d.num_classes, x_scale=scale), "config"
    if d.source == "tokens" and d.kind == "synthetic":
        from accelctl.data import tokens

        t = (d.seq_len,)
        n_train, n_eval = d.num_train or tokens.SYNTHETIC_TRAIN, d.num_eval or tokens.SYNTHETIC_EVAL
        train, ev = (ShapeSplit(n, t, np.dtype(np.int32), t) for n in (n_train, n_eval))
        ds = Dataset("synthetic-tokens", train, ev, d.vocab_size, x_scale=None, tokens=True)
        return ds, "config"
    from accelctl import data

    try:
        if d.source == "tfds":
            unprepared = _tfds_features(cfg)
            if unprepared is not None:
                return unprepared, "features"
        return data.build(d), "source"
    except FieldError as e:
        raise cfg.error_at(e.path, e.message) from None


def _tfds_features(cfg: Config) -> Dataset | None:
    """A tfds data set that is not prepared, described by its registered features (no download,
    no files); None when it is prepared (then its own metadata is read)."""
    from accelctl.data import Dataset, tfds_source

    d = cfg.data
    builder = tfds_source.open_builder(d.name, tfds_source.data_dir_of(d.data_dir))
    if builder.is_prepared():
        return None
    shape, dtype, num_classes = tfds_source._feature_layout(builder, d)
    batch = cfg.train.batch_size
    train = ShapeSplit(batch, shape, dtype)
    ev = ShapeSplit(cfg.train.eval_batch_size or batch, shape, dtype)
    scale = 1.0 / 255.0 if dtype == np.uint8 else None  # as tfds_source.load
    return Dataset(d.name, train, ev, num_classes, x_scale=scale)


def build_abstract_job(cfg: Config) -> tuple[Any, str]:
    """`build_job` on the data set's shapes (`describe_data`): nothing allocated, not compiled.

    Returns:
        (the Job (train.job.Job), where the data's shapes came from); the job's feed is
        host-fed and its state exists only abstractly.
    """
    from accelctl.train.job import build_job

    ds, shapes_from = describe_data(cfg)
    return build_job(cfg, compile_train=False, dataset=ds), shapes_from


def compile_train_step(job: Any, batch: int | None = None) -> Any:
    """Compile the job's train step ahead of time for a host-fed global batch of `batch`
    (default: the job's own), from abstract inputs.

    Returns:
        The jax.stages.Compiled step.
    """
    from accelctl.train.feed import abstract_batch

    batch = batch or job.sizes.batch
    # pmap steps take one row of the batch per device: (devices, B / devices, ...).
    n = job.mesh.size
    lead = (n, batch // n) if job.state.strategy == "pmap" else (batch,)
    inputs = abstract_batch(job.dataset, job.mesh, lead)
    return job.steps.train_jit.lower(job.state.abstract, inputs).compile()


def compiled_memory(compiled: Any, device: Any) -> dict[str, int | None]:
    """Per-device bytes of a compiled step from XLA's memory analysis.

    Returns:
        argument/output/alias/temp bytes, total_bytes (arguments + outputs - aliased (donated)
        + temporaries + generated code: the peak a step needs), device_limit_bytes (None on CPU).
    """
    from accelctl.devices import memory_limit

    ma = compiled.memory_analysis()
    total = (
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        - ma.alias_size_in_bytes
        + ma.temp_size_in_bytes
        + ma.generated_code_size_in_bytes
    )
    return {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "total_bytes": int(total),
        "device_limit_bytes": memory_limit(device) if device is not None else None,
    }


def attention_kernel(compiled: Any, cfg: Config) -> str | None:
    """Which attention the compiled step runs: "cudnn" (a cuDNN fused-attention custom call is in
    the HLO), "xla" (the transformer without one), or None (no attention known: other models)."""
    if CUDNN_ATTENTION in compiled.as_text():
        return "cudnn"
    return "xla" if cfg.model.name == "transformer" else None


def model_flops(cfg: Config, ds: Dataset, batch: int) -> int | None:
    """Analytic training FLOPs of one step of `batch` sequences for the built-in transformer
    (`transformer.training_flops`, MODEL_FLOPS_FORMULA); None for other models."""
    if cfg.model.name != "transformer":
        return None
    from accelctl.models.transformer import training_flops

    m = cfg.model
    return training_flops(
        batch=batch,
        seq_len=ds.input_shape[0],
        num_layers=m.num_layers,
        embed_dim=m.embed_dim,
        mlp_dim=m.mlp_dim or 4 * m.embed_dim,
        vocab_size=ds.num_classes,
    )


def _data_cache(cfg: Config, job: Any, shapes_from: str) -> tuple[str, str, int]:
    """Where training would keep the split (`data.plan_cache`, as the job builder decides it)
    and the bytes it takes on each device when that is the devices (sharded over `data`)."""
    from accelctl import data

    if shapes_from == "features":
        return "unknown", "the split's size is not known before it is prepared", 0
    split = job.dataset.train
    try:
        mode, reason = data.plan_cache(cfg.data.cache, split, job.mesh)
    except FieldError as e:
        raise cfg.error_at(e.path, e.message) from None
    if mode == "device" and job.state.strategy == "pmap":
        if cfg.data.cache == "device":  # refused by the job builder for training too
            raise cfg.error_at(
                ("data", "cache"),
                "device caching gathers batches inside a jit step; strategy pmap feeds each "
                "device its rows from the host: use cache: host or auto",
            )
        mode, reason = "host", "strategy pmap feeds batches from the host"
    if mode != "device" or len(split) == 0:
        return mode, reason, 0
    rows = -(-len(split) // job.mesh.shape["data"])  # padded to a multiple of the data axis
    return mode, reason, int(rows * split.nbytes / len(split))


def _roofline(flops: float, nbytes: float, kind: str, dtype: str) -> dict[str, Any]:
    from accelctl.devices import memory_bandwidth, peak_flops

    peak, bandwidth = peak_flops(kind, dtype), memory_bandwidth(kind)
    compute_s = flops / peak if peak and flops else None
    memory_s = nbytes / bandwidth if bandwidth and nbytes else None
    out: dict[str, Any] = {
        "peak_flops_per_s": peak,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "step_time_s": None,
        "bound": None,
    }
    if compute_s is not None and memory_s is not None:
        out["step_time_s"] = max(compute_s, memory_s)
        out["bound"] = "compute" if compute_s >= memory_s else "memory"
        out["note"] = (
            "a lower bound: XLA's FLOPs at peak rate or its bytes accessed at peak bandwidth, "
            "whichever takes longer; communication and launch overheads not included"
        )
    else:
        missing = [w for w, v in (("peak FLOP/s", peak), ("memory bandwidth", bandwidth)) if not v]
        out["note"] = f"unknown {' and '.join(missing)} for {kind} in {dtype}: no estimate"
    return out


def plan_config(cfg: Config, *, memory_limit: int | None = None) -> dict[str, Any]:
    """Plan one config: build it abstractly, compile its train step and read the analyses.

    Args:
        cfg: the config (its batch size, remat, strategy, ... as they are).
        memory_limit: bytes per device to plan against; None = the device's own (none on CPU).
    Returns:
        One plan (see `plan`'s schema), without remedies.
    """
    job, shapes_from = build_abstract_job(cfg)
    compiled = compile_train_step(job)
    device = job.mesh.devices.flat[0]
    devices = int(job.mesh.size)
    spec = job.state.abstract
    mode, reason, cache_bytes = _data_cache(cfg, job, shapes_from)
    mem = compiled_memory(compiled, device)
    limit = memory_limit if memory_limit is not None else mem["device_limit_bytes"]
    limit_from = "given" if memory_limit is not None else "device" if limit is not None else None
    need = int(mem["total_bytes"] or 0) + cache_bytes
    cost = compiled.cost_analysis() or {}
    flops = float(cost.get("flops", 0.0))  # of one device's partitioned program
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    analytic = model_flops(cfg, job.dataset, job.sizes.batch)
    state_bytes = shard_bytes(spec)
    params_bytes, opt_bytes = shard_bytes(spec.params), shard_bytes(spec.opt_state)
    return {
        "backend": device.platform,
        "device_kind": device.device_kind,
        "devices": devices,
        "mesh": {k: int(v) for k, v in job.mesh.shape.items()},
        "strategy": job.state.strategy,
        "batch_size": job.sizes.batch,
        "precision": cfg.precision.compute,
        "remat": cfg.model.remat,
        "accumulate_steps": cfg.optimizer.accumulate_steps,
        "num_params": job.state.num_params,
        "data": {
            "shapes_from": shapes_from,
            "example_shape": list(job.dataset.input_shape),
            "train_examples": None if shapes_from == "features" else len(job.dataset.train),
            "cache": mode,
            "cache_reason": reason,
        },
        "memory": {
            "params_bytes": params_bytes,
            "opt_state_bytes": opt_bytes,
            "other_state_bytes": state_bytes - params_bytes - opt_bytes,
            "input_bytes": shard_bytes(job.feed.abstract_input),
            "data_cache_bytes": cache_bytes,
            **{k: v for k, v in mem.items() if k != "device_limit_bytes"},
            "need_bytes": need,
            "limit_bytes": limit,
            "limit_from": limit_from,
        },
        "fits": None if limit is None else need <= limit,
        "compute": {
            "flops_per_device": flops or None,
            "flops_per_step": flops * devices or None,
            "bytes_accessed_per_device": bytes_accessed or None,
            "model_flops_per_step": analytic,
            "model_flops_per_device": analytic / devices if analytic else None,
            "model_flops_formula": MODEL_FLOPS_FORMULA if analytic else None,
            "attention_kernel": attention_kernel(compiled, cfg),
        },
        "roofline": _roofline(flops, bytes_accessed, device.device_kind, cfg.precision.compute),
    }


def remedies(cfg: Config, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Changes that lower a step's memory, cheapest first, each as config overrides.

    remat (dots, then full: recompute instead of keep), more gradient-accumulation micro-batches
    (the same update, fewer activations alive), fsdp (parameters and optimizer state sharded over
    the data axis). A smaller batch, the only one that changes the training, is searched apart.
    """
    out: list[dict[str, Any]] = []
    remat = cfg.model.remat
    for mode in ("dots", "full"):
        if remat == "none" or (mode == "full" and remat != "full"):
            out.append({"model.remat": mode})
    k, batch, axis = cfg.optimizer.accumulate_steps, row["batch_size"], row["mesh"]["data"]
    more = 2 * k
    while batch % (more * axis) == 0:
        out.append({"optimizer.accumulate_steps": more})
        more *= 2
    if row["strategy"] == "dp" and axis > 1:
        out.append({"parallel.strategy": "fsdp"})
    return out


def _try(cfg: Config, change: dict[str, Any], limit: int) -> dict[str, Any]:
    """Plan `cfg` with `change` applied; a change this config cannot take is reported, not
    raised (e.g. fsdp for a model whose weights do not divide)."""
    out: dict[str, Any] = {"change": change, "set": [f"--set {k}={v}" for k, v in change.items()]}
    try:
        row = plan_config(config_mod.replace(cfg, change), memory_limit=limit)
    except UserError as e:
        return {**out, "need_bytes": None, "fits": False, "error": str(e)}
    return {**out, "need_bytes": row["memory"]["need_bytes"], "fits": row["fits"]}


def _smaller_batch(cfg: Config, row: dict[str, Any], limit: int) -> dict[str, Any] | None:
    """The largest smaller batch that fits (a binary search, every probe planned), or None."""
    unit = row["mesh"]["data"] * cfg.optimizer.accumulate_steps
    lo, hi, best = 1, row["batch_size"] // unit - 1, None  # in units
    while lo <= hi:
        mid = (lo + hi) // 2
        tried = _try(cfg, {"train.batch_size": mid * unit}, limit)
        if tried["fits"]:
            best, lo = tried, mid + 1
        else:
            hi = mid - 1
    return best


def plan(
    cfg: Config,
    *,
    name: str = "config",
    memory_limit: int | None = None,
    progress_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan a training step (the `plan` command): memory, FLOPs, roofline, fit, remedies.

    Args:
        cfg: the config.
        name: what to call it in the result.
        memory_limit: bytes per device; None = the device's own limit (the CPU has none).
        progress_fn: called with a line of text before each further compile (remedies).
    Returns:
        {"schema", "config", "note" (on CPU), ...plan_config's fields..., "remedies": [tried
        changes, each {change, set, need_bytes, fits}], "suggestion": the first that fits or
        None}. Remedies are tried only when the step does not fit.
    Raises:
        ConfigError / UserError: as `build_job` (bad sizes, a model the backend cannot run).
    """
    row = plan_config(cfg, memory_limit=memory_limit)
    result: dict[str, Any] = {"schema": SCHEMA, "config": name}
    if row["backend"] == "cpu":
        result["note"] = CPU_NOTE
    result.update(row)
    tried: list[dict[str, Any]] = []
    suggestion = None
    limit = row["memory"]["limit_bytes"]
    if row["fits"] is False:
        for change in remedies(cfg, row):
            if progress_fn:
                progress_fn(f"does not fit; planning {change}")
            tried.append(_try(cfg, change, limit))
            if tried[-1]["fits"]:
                suggestion = tried[-1]
                break
        if suggestion is None and row["batch_size"] > row["mesh"]["data"]:
            if progress_fn:
                progress_fn("does not fit; searching a smaller batch")
            suggestion = _smaller_batch(cfg, row, limit)
            if suggestion is not None:
                tried.append(suggestion)
    result["remedies"] = tried
    result["suggestion"] = suggestion
    return result
