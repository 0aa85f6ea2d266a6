"""Host-side batching: seeded per-epoch shuffling, fixed-shape batches, per-process slices.

Every batch has a static shape so the jitted step compiles once: training drops the incomplete
last batch of an epoch; evaluation pads the last batch and marks the padding with `mask = 0`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from accelctl.data.sources import Split

HostBatch = dict[str, np.ndarray]


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Return the shuffled example order of one epoch (a pure function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    start_step: int,
    num_steps: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[HostBatch]:
    """Yield this process's part of the global training batches for steps [start_step, num_steps).

    Args:
        split: training examples.
        batch_size: global batch size (all processes).
        seed: shuffling seed; epoch e uses `epoch_permutation(n, seed=seed, epoch=e)`.
        start_step: first step to produce (resuming needs no replay of earlier batches).
        num_steps: one past the last step.
        process_index, process_count: this process's slice of each global batch.
    Yields:
        {"x": (batch_size / process_count, ...), "y": (batch_size / process_count,)}.
    """
    steps_per_epoch = len(split) // batch_size
    local = _process_slice(batch_size, process_index, process_count)
    perm, perm_epoch = None, -1
    for step in range(start_step, num_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(len(split), seed=seed, epoch=epoch), epoch
        assert perm is not None
        idx = np.sort(perm[i * batch_size : (i + 1) * batch_size][local])
        yield {"x": split.x[idx], "y": split.y[idx]}


def eval_batches(
    split: Split, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[HostBatch]:
    """Yield the eval split in order, padding the last batch; `mask` is 1 for real examples.

    Yields:
        {"x": (batch_size / process_count, ...), "y": (...,), "mask": (...,) float32}.
    """
    n = len(split)
    local = _process_slice(batch_size, process_index, process_count)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[local]
        valid = idx < n
        idx = np.where(valid, idx, 0)
        yield {
            "x": split.x[idx],
            "y": np.where(valid, split.y[idx], 0).astype(split.y.dtype),
            "mask": valid.astype(np.float32),
        }
