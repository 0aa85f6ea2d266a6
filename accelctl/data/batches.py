"""Host-side batching: seeded per-epoch shuffling, fixed-shape batches, per-process slices.

Every batch has a static shape so the jitted step compiles once: training drops the incomplete
last batch of an epoch; evaluation pads the last batch and marks the padding with `mask = 0`.
The order of examples is a pure function of (seed, epoch), laid out by `epoch_batch_table`; the
host path (`train_batches`) and the device cache read the same table, so they give the same
batches, and a run can start at any step without replaying data (`DataPosition`).

A split too large for a per-epoch table (a token corpus has one example per token offset) picks
each step's examples itself with `batch_indices(step, batch_size, *, seed)`, a pure function of
(seed, step) too, so resuming stays exact while memory does not grow with the split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from accelctl.data.sources import SplitLike
from accelctl.errors import UserError

HostBatch = dict[str, np.ndarray]


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Return the shuffled example order of one epoch (a pure function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batch_table(n: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """Return the example indices of every global batch of one epoch.

    Each row is sorted (better read locality). The table does not depend on the number of
    processes: each takes a contiguous part of a row, which is sorted too, so the global batch
    is the same examples in the same order on any process count (dropout masks then fall on the
    same examples, and a multi-process run reproduces a single-process one).

    Args:
        n: examples in the split.
        batch_size: global batch size.
        seed, epoch: select the permutation (`epoch_permutation`).
    Returns:
        int32 array (n // batch_size, batch_size); row i is the global batch of step i of the epoch.
    """
    steps = n // batch_size
    perm = epoch_permutation(n, seed=seed, epoch=epoch)[: steps * batch_size]
    return np.sort(perm.reshape(steps, batch_size), axis=1).astype(np.int32)


def sampled(split: SplitLike) -> bool:
    """Whether `split` picks each step's examples itself (`batch_indices`) instead of the
    epoch permutation; such a split is streamed, never cached."""
    return callable(getattr(split, "batch_indices", None))


def _process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


@dataclass(frozen=True)
class DataPosition:
    """Where the input pipeline stands: the next step to run and its place in the epoch.

    Small and JSON-serialisable, so a checkpoint can store it and a resumed run continues with
    exactly the batch an uninterrupted run would have used next.
    """

    step: int
    epoch: int
    batch_in_epoch: int
    seed: int

    @classmethod
    def at(cls, step: int, *, steps_per_epoch: int, seed: int) -> DataPosition:
        """Return the position before running global step `step` (0-based)."""
        epoch, i = divmod(step, steps_per_epoch)
        return cls(step=step, epoch=epoch, batch_in_epoch=i, seed=seed)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, steps_per_epoch: int) -> DataPosition:
        """Rebuild a stored position, checking it is consistent with this run's epoch size."""
        try:
            pos = cls(**{k: int(d[k]) for k in ("step", "epoch", "batch_in_epoch", "seed")})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"stored data position {d!r} is incomplete or malformed ({e})"
            ) from None
        if pos != cls.at(pos.step, steps_per_epoch=steps_per_epoch, seed=pos.seed):
            raise UserError(
                f"stored data position {d!r} does not match {steps_per_epoch} steps per epoch: "
                "the batch size or the training split changed since it was written"
            )
        return pos


def train_batches(
    split: SplitLike,
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
        seed: shuffling seed (see `epoch_batch_table`, or the split's own `batch_indices`).
        start_step: first step to produce (resuming needs no replay of earlier batches).
        num_steps: one past the last step.
        process_index, process_count: this process's slice of each global batch; only those
            examples are read.
    Yields:
        {"x": (batch_size / process_count, ...), "y": (batch_size / process_count,)}.
    """
    local = _process_slice(batch_size, process_index, process_count)
    if sampled(split):
        pick = split.batch_indices  # type: ignore[attr-defined]
        for step in range(start_step, num_steps):
            x, y = split.take(np.asarray(pick(step, batch_size, seed=seed))[local])
            yield {"x": x, "y": y}
        return
    steps_per_epoch = len(split) // batch_size
    table, table_epoch = None, -1
    for step in range(start_step, num_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != table_epoch:
            table = epoch_batch_table(len(split), batch_size, seed=seed, epoch=epoch)
            table_epoch = epoch
        assert table is not None
        x, y = split.take(table[i, local])
        yield {"x": x, "y": y}


def eval_batches(
    split: SplitLike, batch_size: int, *, process_index: int = 0, process_count: int = 1
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
        x, y = split.take(np.where(valid, idx, 0))
        keep = valid.reshape(valid.shape + (1,) * (y.ndim - 1))  # token targets are (B, T)
        yield {
            "x": x,
            "y": np.where(keep, y, 0).astype(y.dtype),
            "mask": valid.astype(np.float32),
        }
