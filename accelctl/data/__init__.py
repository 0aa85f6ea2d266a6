"""Data: sources → host batches (numpy) → prefetch thread → sharded device arrays, or the whole
training split cached on the devices (`device_cache`) with batches gathered there.

This package is the only place that moves data onto devices (`make_put_fn`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from accelctl.data.augment import augment_images
from accelctl.data.batches import (
    DataPosition,
    HostBatch,
    epoch_batch_table,
    epoch_permutation,
    eval_batches,
    sampled,
    train_batches,
)
from accelctl.data.device_cache import DeviceFeed, make_gather, place_split, plan_cache
from accelctl.data.prefetch import Prefetcher
from accelctl.data.sources import SOURCES, Dataset, LocatedSplit, Split, SplitLike

__all__ = [
    "DataPosition",
    "Dataset",
    "DeviceFeed",
    "HostBatch",
    "LocatedSplit",
    "Prefetcher",
    "Split",
    "SplitLike",
    "augment_images",
    "build",
    "epoch_batch_table",
    "epoch_permutation",
    "eval_batches",
    "make_gather",
    "make_put_fn",
    "place_split",
    "plan_cache",
    "sampled",
    "train_batches",
]


def build(cfg: Any, *, obj: Any = None) -> Dataset:
    """Load the data set named by the `data` config section.

    Args:
        cfg: the `data` section.
        obj: `source: python` only: the user's loader itself, or what it returns, instead of
            importing `data.target` (the Python API's `data=`); None imports it.
    Returns:
        The Dataset (host arrays, or streamed splits read a batch at a time).
    """
    if obj is not None:
        if cfg.source != "python":
            raise ValueError(f"a data object needs data.source: python, not {cfg.source}")
        return SOURCES["python"](cfg, obj)
    return SOURCES[cfg.source](cfg)


def make_put_fn(
    sharding: jax.sharding.Sharding, *, per_device: int | None = None
) -> Callable[[HostBatch], dict[str, jax.Array]]:
    """Return a function that places a process-local host batch on the devices.

    Args:
        sharding: the step's input sharding (batch dimension along the `data` mesh axis).
        per_device: for `jax.pmap` steps, the number of devices: each array (B, ...) is
            reshaped on the host to (per_device, B / per_device, ...), one row per device.
    Returns:
        fn(host_batch) -> dict of global jax.Arrays with that sharding. With several processes,
        each contributes its local rows (`make_array_from_process_local_data`).
    """
    if per_device is not None:
        n = per_device
        plain = make_put_fn(sharding)

        def put_rows(batch: HostBatch) -> dict[str, jax.Array]:
            return plain({k: np.asarray(v).reshape(n, -1, *v.shape[1:]) for k, v in batch.items()})

        return put_rows
    if jax.process_count() == 1:

        def put(batch: HostBatch) -> dict[str, jax.Array]:
            return jax.device_put(batch, sharding)

    else:

        def put(batch: HostBatch) -> dict[str, jax.Array]:
            return {
                k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()
            }

    return put
