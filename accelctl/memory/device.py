"""Device memory before anything exists: what each device holds (its own limit, or the host
memory the CPU devices share) and whether the train state, described abstractly, fits it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accelctl.errors import OutOfMemory
from accelctl.memory import host
from accelctl.memory.host import format_bytes, show_bytes

WAYS_OUT = (
    "a smaller train.batch_size; optimizer.accumulate_steps: 2, 4, ... (the same update from "
    "smaller micro-batches); parallel.strategy: fsdp (parameters and optimizer state sharded "
    "over the devices of the data axis); model.remat: dots or full (activations recomputed "
    "instead of kept). `accelctl plan CONFIG` shows where the memory goes and checks each "
    "change before a run"
)


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs (or arrays) with shardings."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _fsdp_bytes(tree: Any, data_size: int) -> int:
    """Bytes one device would hold of `tree` under strategy fsdp (parallel.fsdp_spec)."""
    import jax

    from accelctl.parallel import fsdp_spec

    total = 0
    for leaf in jax.tree.leaves(tree):
        spec = fsdp_spec(tuple(leaf.shape), data_size)
        axes = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        shape = [
            d // data_size if a == "data" else d for d, a in zip(leaf.shape, axes, strict=True)
        ]
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


@dataclass(frozen=True)
class Budget:
    """What each device of a mesh can hold.

    Attributes:
        per_device: each device's limit (the smallest of this process's devices); or, for
            devices without one (CPU: they share the host's memory), the host memory available
            now divided among them; None when neither is known.
        devices: this process's devices in the mesh.
        shared: the devices report no limit and share the host's memory.
        host: the host memory available now (shared devices only).
        kind: the devices' kind, e.g. "NVIDIA H200" or "cpu".
    """

    per_device: int | None
    devices: int
    shared: bool
    host: int | None
    kind: str

    def need_text(self, per_device: int) -> str:
        """What `per_device` bytes on every device mean here, for a message."""
        if self.shared and self.devices > 1:
            return (
                f"{show_bytes(per_device)} per device, {format_bytes(per_device * self.devices)} "
                f"for the {self.devices} {self.kind} devices, which share the host's memory"
            )
        return f"{show_bytes(per_device)} per device"

    def available_text(self) -> str:
        """What the devices have, for a message."""
        if self.shared:
            return f"the {show_bytes(self.host or 0)} of host memory available now"
        return f"the {show_bytes(self.per_device or 0)} each {self.kind} offers"


def device_budget(mesh: Any) -> Budget:
    """What each device of `mesh` can hold (`devices.memory_limit`, or the shared host memory)."""
    from accelctl import devices

    local = list(mesh.local_devices)
    kind = str(local[0].device_kind)
    limits = [devices.memory_limit(d) for d in local]
    if all(limit is not None for limit in limits):
        return Budget(min(limits), len(local), False, None, kind)  # type: ignore[type-var]
    free = host.host_available_bytes()
    per_device = None if free is None else free // len(local)
    return Budget(per_device, len(local), True, free, kind)


def check_state(spec: Any, mesh: Any, *, eval_only: bool) -> None:
    """Refuse, before any of it exists, a train state the devices cannot hold.

    Args:
        spec: the job's StateSpec (abstract state with its shardings).
        mesh: the device mesh.
        eval_only: only the parameters and the model state will exist (evaluation restores
            nothing else).
    Raises:
        OutOfMemory: its bytes per device exceed the device's limit (or, on shared devices,
            the available host memory), with the ways out (fsdp's share computed).
    """
    budget = device_budget(mesh)
    if budget.per_device is None:
        return
    abstract = spec.abstract
    params, model_state = shard_bytes(abstract.params), shard_bytes(abstract.model_state)
    opt = 0 if eval_only else shard_bytes(abstract.opt_state)
    need = params + model_state if eval_only else shard_bytes(abstract)
    if need <= budget.per_device:
        return
    parts = [f"parameters {format_bytes(params)}"]
    if opt:
        parts.append(f"optimizer state {format_bytes(opt)}")
    if model_state:
        parts.append(f"model state {format_bytes(model_state)}")
    axis = int(mesh.shape["data"])
    what = "the parameters to evaluate" if eval_only else "the train state"
    copies = (
        f"strategy {spec.strategy} keeps a whole copy on each device"
        if spec.strategy in ("dp", "pmap") and mesh.size > 1
        else f"strategy {spec.strategy}"
    )
    ways = []
    if spec.strategy in ("dp", "pmap") and axis > 1:
        sharded = _fsdp_bytes(abstract.params, axis) + model_state
        if not eval_only:
            sharded += _fsdp_bytes(abstract.opt_state, axis) + (need - params - opt - model_state)
        verdict = "fits" if sharded <= budget.per_device else "still too much"
        ways.append(
            f"parallel.strategy: fsdp shards the parameters and optimizer state over the {axis} "
            f"devices of the data axis: about {format_bytes(sharded)} per device ({verdict})"
        )
    elif spec.strategy == "fsdp":
        ways.append(
            f"more devices on the data axis (fsdp divides the state among them: {axis} now)"
        )
    elif axis == 1:
        ways.append(
            "more devices with parallel.strategy: fsdp, which shards the parameters and "
            "optimizer state over the data axis (it has 1 device here)"
        )
    ways.append(f"a smaller model ({spec.num_params:,} parameters now)")
    if opt:
        ways.append("an optimizer that keeps less state per parameter")
    raise OutOfMemory(
        f"{what} needs {budget.need_text(need)} ({', '.join(parts)}; {spec.num_params:,} "
        f"parameters, {copies}), more than {budget.available_text()}; nothing was allocated. "
        f"Ways out: {'; '.join(ways)}."
    )
