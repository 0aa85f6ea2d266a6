"""Sharding in one place: the device mesh, batch and state shardings, strategy rules.

Mesh axes are ("data", "model"). Every strategy shards the batch along `data`. What differs is
the train state:
- dp: parameters and optimizer state replicated on every device;
- fsdp: parameters and optimizer state split over `data`, each array along its largest
  dimension that the axis divides (smaller arrays stay replicated); XLA gathers them for use;
- tp: weights split over `model` by the logical axis names the models give them (Flax NNX's
  `out_sharding` metadata: `nnx.with_partitioning` or `models.layers.logical`), mapped through
  TP_RULES: Megatron column/row parallelism;
- pmap: dp through `jax.pmap` (one program per device, gradients averaged with `pmean`);
- auto: dp while the replicated state is small next to one device's memory, else fsdp.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.config import Config

AXES = ("data", "model")

# Logical weight axis -> mesh axis under tp. "embed" (the model width) stays whole, so a
# column-split layer ("embed", "mlp") followed by a row-split one ("mlp", "embed") needs a single
# all-reduce per pair; "vocab" stays whole as well (the output softmax is not split).
TP_RULES: dict[str, str | None] = {"mlp": "model", "heads": "model", "embed": None, "vocab": None}

# auto picks fsdp once the replicated train state would take more than this share of a device.
AUTO_STATE_FRACTION = 0.25


def select_devices(cfg: Config) -> list[jax.Device]:
    """Return the devices the run uses: all visible ones, or the first `parallel.num_devices`."""
    devices = jax.devices()
    wanted = cfg.parallel.num_devices
    if wanted is None:
        return devices
    if wanted > len(devices):
        raise cfg.error_at(
            ("parallel", "num_devices"),
            f"asks for {wanted} devices but only {len(devices)} "
            f"{devices[0].platform.upper()} device(s) are visible; lower it or set it to null",
        )
    return devices[:wanted]


def make_mesh(cfg: Config) -> Mesh:
    """Build the ("data", "model") mesh over the selected devices.

    Returns:
        Mesh of shape (data, model); `data: -1` takes all devices not used by `model`.
    Raises:
        ConfigError: if the axis sizes do not multiply to the device count.
    """
    devices = select_devices(cfg)
    n, model = len(devices), cfg.parallel.mesh.model
    data = cfg.parallel.mesh.data if cfg.parallel.mesh.data != -1 else n // model
    if data * model != n:
        raise cfg.error_at(
            ("parallel", "mesh"),
            f"data={data} x model={model} does not use the {n} devices in use; set data: -1 "
            "or sizes whose product is the device count (or set parallel.num_devices)",
        )
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


def check_batch_size(cfg: Config, mesh: Mesh, batch_size: int, field: str) -> None:
    """Raise a located ConfigError unless `batch_size` splits over the data axis and processes."""
    parts = mesh.shape["data"]
    if batch_size % parts or batch_size % jax.process_count():
        lower, upper = (batch_size // parts) * parts, (batch_size // parts + 1) * parts
        raise cfg.error_at(
            ("train", field),
            f"{batch_size} does not divide over the {parts} devices of the data axis; use a "
            f"multiple of {parts} (e.g. {lower or parts} or {upper}), or change "
            "parallel.num_devices",
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (batch) dimension split along `data`."""
    return NamedSharding(mesh, P("data"))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (micro-batches, batch / micro-batches, ...) stack: rows along `data`."""
    return NamedSharding(mesh, P(None, "data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole on every device."""
    return NamedSharding(mesh, P())


def resolve_strategy(cfg: Config, mesh: Mesh, abstract_state: Any) -> tuple[str, str]:
    """The strategy to run (auto resolved) and why.

    Args:
        cfg: the config (`parallel.strategy`).
        mesh: the device mesh.
        abstract_state: the train state's ShapeDtypeStructs.
    Returns:
        (strategy, reason).
    """
    strategy = cfg.parallel.strategy
    if strategy != "auto":
        return strategy, "set in the config"
    from accelctl.devices import memory_limit

    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    limit = memory_limit(mesh.local_devices[0])  # only this process's devices can be asked
    if limit is None:
        return "dp", "auto: the device reports no memory limit, so the state is replicated"
    share = state_bytes / limit
    if share <= AUTO_STATE_FRACTION:
        return "dp", f"auto: the train state takes {share:.1%} of a device when replicated"
    return "fsdp", f"auto: the train state would take {share:.1%} of a device when replicated"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def fsdp_spec(shape: tuple[int, ...], data_size: int) -> P:
    """Split the largest dimension that `data_size` divides over `data`; P() if none does."""
    fits = [i for i, d in enumerate(shape) if d >= data_size and d % data_size == 0]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: shape[i])
    return P(*(["data" if i == axis else None for i in range(len(shape))]))


def logical_names(var: Any) -> tuple[str | None, ...] | None:
    """The logical axis names of an NNX variable (`out_sharding` metadata), or None."""
    if not _is_variable(var):
        return None
    names = var.get_metadata().get("out_sharding")
    if names is None or isinstance(names, jax.sharding.Sharding):
        return None
    return tuple(names)


def _mesh_axis(name: str | None, mesh: Mesh) -> str | None:
    """The mesh axis a logical name maps to under tp: TP_RULES, or the name itself when it is
    already the model axis (a user's `nnx.with_partitioning(init, (None, "model"))`)."""
    if name is None:
        return None
    if name in TP_RULES:
        return TP_RULES[name]
    return name if name == "model" and name in mesh.shape else None


def tp_spec(shape: tuple[int, ...], names: tuple[str | None, ...] | None, mesh: Mesh) -> P:
    """Map a weight's logical axis names through TP_RULES; an axis the mesh axis does not divide
    (or an unnamed weight) stays whole."""
    if not names or len(names) != len(shape):
        return P()
    axes = []
    for dim, name in zip(shape, names, strict=True):
        target = _mesh_axis(name, mesh)
        axes.append(target if target is not None and dim % mesh.shape[target] == 0 else None)
    return P(*axes)


def check_tp_names(cfg: Config, mesh: Mesh, abstract_params: Any) -> None:
    """Raise a located ConfigError when strategy tp would split nothing: no weight of the model
    has a logical axis name that maps to the model axis (before anything is compiled)."""
    variables = jax.tree.leaves(abstract_params, is_leaf=_is_variable)
    for var in variables:
        names = logical_names(var)
        if names and any(_mesh_axis(n, mesh) for n in names):
            return
    raise cfg.error_at(
        ("parallel", "strategy"),
        "tp splits weights by their logical axis names, but no weight of this model names an "
        f"axis that maps to the model axis ({', '.join(k for k, v in TP_RULES.items() if v)} or "
        "'model'). Name them with nnx.with_partitioning(init, ('embed', 'mlp')) or "
        "kernel_metadata={'out_sharding': ('embed', 'mlp')} (see the README), or use dp/fsdp",
    )


def state_shardings(mesh: Mesh, abstract_state: Any, strategy: str) -> Any:
    """Shardings for every leaf of the train state under `strategy` (auto already resolved).

    Args:
        mesh: the device mesh.
        abstract_state: the TrainState of ShapeDtypeStructs (from `jax.eval_shape`).
        strategy: dp, fsdp, tp or pmap.
    Returns:
        A TrainState-shaped pytree of NamedShardings. Only `params` and `opt_state` are ever
        split; step, RNG, metric sums, model state (e.g. batch-norm statistics) stay replicated.
    """
    repl = replicated(mesh)
    out = jax.tree.map(lambda _: repl, abstract_state)
    if strategy in ("dp", "pmap"):
        return out
    if strategy not in ("fsdp", "tp"):
        raise ValueError(f"unknown strategy {strategy!r}")

    def spec(x: Any) -> P:
        var = x if _is_variable(x) else None
        shape = tuple((var.get_value() if var is not None else x).shape)
        if strategy == "fsdp":
            return fsdp_spec(shape, mesh.shape["data"])
        return tp_spec(shape, logical_names(var), mesh)

    def shard(tree: Any) -> Any:
        # Keep the Variable wrappers (their metadata carries the logical names) in the result.
        return jax.tree.map(
            lambda x: jax.tree.map(lambda _: NamedSharding(mesh, spec(x)), x),
            tree,
            is_leaf=_is_variable,
        )

    return out.replace(
        params=shard(abstract_state.params), opt_state=shard(abstract_state.opt_state)
    )
