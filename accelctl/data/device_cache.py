"""The training split on the devices: placed once, sharded over `data`, batches gathered there.

Each device holds 1/D of the examples (D = size of the `data` mesh axis). A step's global batch
is a row of the epoch's index table (`epoch_batch_table`, the same table the host path reads);
every device picks the rows it owns, zeros the rest, and a reduce-scatter over `data` hands each
device its own slice of the batch. The only per-epoch transfer is the index table; there is no
host-to-device copy per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from accelctl.data.batches import epoch_batch_table, sampled
from accelctl.data.sources import Split, SplitLike
from accelctl.devices import memory_limit
from accelctl.errors import FieldError

try:  # jax >= 0.6 exports shard_map at the top level
    from jax import shard_map
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]

DEVICE_FRACTION = 0.25  # of device memory a cached split may use (`cache: auto`)
HOST_FRACTION = 0.5  # of available host memory a decoded split may use (`cache: auto`)

Feed = dict[str, Any]


def available_host_bytes() -> int:
    """Return the host memory not in use now (physical pages available)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_budget_bytes(mesh: Mesh) -> int:
    """Return the bytes a device-cached split may take in total over the mesh's devices.

    A quarter of the devices' memory limit; devices that report no limit (the CPU backend) share
    host memory, so a quarter of the available host memory is used instead. Only this process's
    devices can be asked; the others are taken to be alike.
    """
    local = mesh.local_devices
    limits = [limit for d in local if (limit := memory_limit(d)) is not None]
    if len(limits) < len(local):
        return int(DEVICE_FRACTION * available_host_bytes())
    return int(DEVICE_FRACTION * sum(limits) * mesh.size / len(local))


def plan_cache(requested: str, split: SplitLike, mesh: Mesh) -> tuple[str, str]:
    """Decide where the training split lives: "device", "host" or "none" (streamed).

    Args:
        requested: the config's `data.cache` (auto, device, host, none).
        split: the training split (its `nbytes` is known, or estimated, without reading it).
        mesh: the devices it would be sharded over.
    Returns:
        (mode, reason): the reason says why, for `Setup.cache_reason`.
    Raises:
        FieldError: on data.cache: device or host asked for a split that samples its own
            batches (a memory-mapped token corpus), which is only ever streamed.
    """
    size = split.nbytes
    if sampled(split):
        if requested in ("device", "host"):
            raise FieldError(
                ("data", "cache"),
                f"cache: {requested} would read the whole {size / 2**20:.1f} MiB token corpus "
                "into memory, but its windows are sampled at any token offset and read from the "
                "memory-mapped file each step; use cache: auto",
            )
        return "none", "windows are read from the memory-mapped token file each step"
    if requested != "auto":
        return requested, "set in the config"
    budget = device_budget_bytes(mesh)
    if size <= budget:
        return "device", f"{size / 2**20:.1f} MiB fits a quarter of device memory"
    if not isinstance(split, Split) and not getattr(split, "auto_host", True):
        return "none", f"{size / 2**20:.1f} MiB exceeds a quarter of device memory (streamed)"
    if not isinstance(split, Split) and size > HOST_FRACTION * available_host_bytes():
        return "none", f"{size / 2**20:.1f} MiB exceeds half the free host memory"
    return "host", f"{size / 2**20:.1f} MiB exceeds a quarter of device memory"


def _put_global(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (explicit transfer)."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def place_split(split: Split, mesh: Mesh) -> dict[str, jax.Array]:
    """Put a split on the devices, examples sharded over `data` (padded to a multiple of it).

    Returns:
        {"x": (N_pad, ...), "y": (N_pad,)} sharded P("data"); with several processes each one
        fills only its own devices' rows.
    """
    d = mesh.shape["data"]
    n_pad = -(-len(split) // d) * d
    sharding = NamedSharding(mesh, P("data"))

    def put(a: np.ndarray) -> jax.Array:
        if n_pad != len(a):
            a = np.concatenate([a, np.zeros((n_pad - len(a), *a.shape[1:]), a.dtype)])
        return _put_global(a, sharding)

    return {"x": put(split.x), "y": put(split.y)}


def make_gather(mesh: Mesh) -> Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]:
    """Return gather(cache, idx) -> batch, jittable, with no host involvement.

    Args (of the returned function):
        cache: from `place_split`.
        idx: (B,) int32 global example indices, replicated.
    Returns (of the returned function):
        {"x": (B, ...), "y": (B,)} sharded P("data"), equal to `split.take(idx)`.
    """

    data_size = mesh.shape["data"]

    def local_gather(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        n_local = x.shape[0]
        local = idx - jax.lax.axis_index("data") * n_local
        owned = (local >= 0) & (local < n_local)
        safe = jnp.clip(local, 0, n_local - 1)

        def pick(a: jax.Array) -> jax.Array:
            # Gathering whole flat rows is ~6x faster on XLA:CPU than an N-d gather.
            rows = jnp.take(a.reshape(n_local, -1), safe, axis=0, mode="clip")
            # Exactly one device owns each row, so the sum below reassembles it exactly.
            rows = jnp.where(owned[:, None], rows, jnp.zeros((), rows.dtype))
            rows = rows.reshape((idx.shape[0], *a.shape[1:]))
            if data_size == 1:  # nothing to exchange (and a 1-way reduce-scatter is not free)
                return rows
            return jax.lax.psum_scatter(rows, "data", scatter_dimension=0, tiled=True)

        return pick(x), pick(y)

    gathered = shard_map(
        local_gather,
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=(P("data"), P("data")),
    )

    def gather(cache: dict[str, jax.Array], idx: jax.Array) -> dict[str, jax.Array]:
        x, y = gathered(cache["x"], cache["y"], idx)
        return {"x": x, "y": y}

    return gather


class DeviceFeed:
    """Step inputs for the device cache: the cached split plus the epoch's index table.

    Yields the same dict for every step of an epoch (the step picks its row by step number);
    a new table is placed at each epoch boundary. Same interface as `Prefetcher`.
    """

    def __init__(
        self,
        cache: dict[str, jax.Array],
        mesh: Mesh,
        *,
        num_examples: int,
        batch_size: int,
        seed: int,
        start_step: int,
        num_steps: int,
    ) -> None:
        self.cache, self.mesh = cache, mesh
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self.step, self.num_steps = start_step, num_steps
        self._epoch, self._feed = -1, None
        self.wait_time_s = 0.0
        self.items = 0

    def _table(self, epoch: int) -> jax.Array:
        # Every process computes the same table, so each fills its devices' copy locally.
        table = epoch_batch_table(self.n, self.batch_size, seed=self.seed, epoch=epoch)
        return _put_global(table, NamedSharding(self.mesh, P()))

    def __iter__(self) -> Iterator[Feed]:
        return self

    def __next__(self) -> Feed:
        if self.step >= self.num_steps:
            raise StopIteration
        epoch = self.step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._feed = epoch, {"cache": self.cache, "idx": self._table(epoch)}
        self.step += 1
        self.items += 1
        assert self._feed is not None
        return self._feed

    def close(self) -> None:
        self.step = self.num_steps

    def __enter__(self) -> DeviceFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
