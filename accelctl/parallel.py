"""Sharding in one place: the device mesh, batch and state shardings, strategy rules.

Mesh axes are ("data", "model"). Strategy `dp` shards the batch along `data` and replicates the
parameters and optimizer state; later strategies (fsdp, tp, pmap) plug in here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.config import Config

AXES = ("data", "model")


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


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole on every device."""
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state: Any, strategy: str) -> Any:
    """Shardings for every leaf of the train state under `strategy`.

    Args:
        mesh: the device mesh.
        abstract_state: the state's pytree of ShapeDtypeStructs (from `jax.eval_shape`).
        strategy: "dp" (parameters and optimizer state replicated).
    Returns:
        A pytree of NamedShardings with the structure of `abstract_state`.
    """
    if strategy != "dp":
        raise NotImplementedError(f"strategy {strategy!r}")
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
