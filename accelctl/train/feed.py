"""The data feed of a job: where the training split lives and how batches reach the steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from accelctl import data, parallel
from accelctl.data import Dataset, Split


@dataclass(frozen=True)
class DataFeed:
    """The data set, where its training split lives, and what the train step is fed.

    Attributes:
        dataset: the splits and what the model needs to know about them.
        cache_mode: device (split on the devices, batches gathered there), host (batches cut
            from host memory in the prefetch thread) or none (read from files per batch).
        cache_reason: why that mode.
        device_cache: the split's arrays on the devices (cache_mode device), else None.
        put_fn: host batch -> sharded device arrays (eval batches; train batches unless pmap).
        train_put_fn: host train batch -> the train step's input.
        abstract_input: ShapeDtypeStructs (with shardings) of the train step's second argument.
        mesh: the device mesh.
        batch_size: global batch.
    """

    dataset: Dataset
    cache_mode: str
    cache_reason: str
    device_cache: dict[str, jax.Array] | None
    put_fn: Callable[[data.HostBatch], Any]
    train_put_fn: Callable[[data.HostBatch], Any]
    abstract_input: Any
    mesh: Mesh
    batch_size: int

    @classmethod
    def make(
        cls, ds: Dataset, mesh: Mesh, batch: int, mode: str, reason: str, *, pmap: bool
    ) -> DataFeed:
        """Place the split (cache_mode device) and describe the train step's input."""
        batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        put_fn = data.make_put_fn(batch_sh)
        device_cache = None
        if mode == "device":
            assert isinstance(ds.train, Split)
            device_cache = data.place_split(ds.train, mesh)
            spe = len(ds.train) // batch
            abstract: Any = {
                "cache": device_cache,
                "idx": jax.ShapeDtypeStruct((spe, batch), jnp.int32, sharding=repl),
            }
        else:
            # pmap steps take one row of the batch per device: (devices, B / devices, ...).
            lead = (mesh.size, batch // mesh.size) if pmap else (batch,)
            abstract = abstract_batch(ds, mesh, lead)
        train_put = data.make_put_fn(batch_sh, per_device=mesh.size) if pmap else put_fn
        return cls(ds, mode, reason, device_cache, put_fn, train_put, abstract, mesh, batch)

    @property
    def input_shardings(self) -> Any:
        """Shardings of the train step's input (for `jax.jit(in_shardings=...)`)."""
        batch_sh = parallel.batch_sharding(self.mesh)
        if self.device_cache is not None:
            return {"cache": {"x": batch_sh, "y": batch_sh}, "idx": parallel.replicated(self.mesh)}
        return batch_sh

    def train_inputs(
        self, *, seed: int, start_step: int, num_steps: int, depth: int
    ) -> AbstractContextManager[Iterator[Any]]:
        """The train step's inputs for steps [start_step, num_steps).

        Host modes: a `Prefetcher` of sharded batches (`depth` ready on the devices); device
        cache: a `DeviceFeed`. Both have `wait_time_s` (time the loop waited for input) and are
        context managers.
        """
        if self.device_cache is not None:
            return data.DeviceFeed(
                self.device_cache,
                self.mesh,
                num_examples=len(self.dataset.train),
                batch_size=self.batch_size,
                seed=seed,
                start_step=start_step,
                num_steps=num_steps,
            )
        host_batches = data.train_batches(
            self.dataset.train,
            self.batch_size,
            seed=seed,
            start_step=start_step,
            num_steps=num_steps,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return data.Prefetcher(host_batches, self.train_put_fn, depth=depth)

    def eval_inputs(self, batch_size: int) -> AbstractContextManager[Iterator[Any]]:
        """The eval split in order as sharded batches with a `mask` (padding = 0)."""
        batches = data.eval_batches(
            self.dataset.eval,
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return data.Prefetcher(batches, self.put_fn, depth=2, name="accelctl-eval")


def abstract_batch(ds: Dataset, mesh: Mesh, lead: tuple[int, ...]) -> dict[str, Any]:
    """ShapeDtypeStructs of a train batch with leading dims `lead` (batch, or devices x rows)."""
    sh = parallel.batch_sharding(mesh)
    y_shape = ds.train.example_shape if ds.tokens else ()
    return {
        "x": jax.ShapeDtypeStruct((*lead, *ds.input_shape), ds.train.x_dtype, sharding=sh),
        "y": jax.ShapeDtypeStruct((*lead, *y_shape), jnp.int32, sharding=sh),
    }
