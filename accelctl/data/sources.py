"""Data sources: each returns a `Dataset` with a fixed train/eval split.

A split is either in host memory (`Split`, numpy arrays) or streamed (`tfds` and a `python`
random-access source with `cache: none`, a memory-mapped token `.bin`); all answer
`take(indices)` with a batch of numpy arrays. Images stay in their
compact integer dtype on the host; `Dataset.x_scale` (and optional mean/std) tell the jitted step
how to turn them into floats on the device (4x fewer bytes to move than float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from accelctl.errors import FieldError, UserError
from accelctl.memory import check_host_bytes


@dataclass(frozen=True)
class Split:
    """Examples of one split: x (N, *input_shape) and integer labels y (N,), or for token
    data sets per-position targets y (N, T) beside tokens x (N, T)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return self.x.dtype

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (x[idx], y[idx]) for an integer index array."""
        return self.x[idx], self.y[idx]


class SplitLike(Protocol):
    """What batching needs from a split: its size, example layout and batched reads."""

    def __len__(self) -> int: ...

    @property
    def example_shape(self) -> tuple[int, ...]: ...

    @property
    def x_dtype(self) -> np.dtype[Any]: ...

    @property
    def nbytes(self) -> int: ...

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# Optional members a streamed split may add to `SplitLike` (looked up with getattr):
# - `load() -> Split`: read it whole, for `cache: device | host`.
# - `batch_indices(step, batch_size, *, seed) -> (batch_size,) int array`: the split picks each
#   step's examples itself (a pure function of seed and step) instead of the epoch permutation;
#   such a split is never cached (see `batches.sampled`).
# - `auto_host: bool` (default True): whether `cache: auto` may read it whole into host memory
#   when it does not fit the devices; False streams it instead.


class LocatedSplit:
    """A streamed split whose read errors name their place in the config file.

    A streamed split raises `FieldError`s (a row of another shape, a token beyond the
    vocabulary) when a batch is read, in the prefetch thread, long after the job builder turned
    load-time FieldErrors into located errors; this wrapper does the same at read time.

    Args:
        split: the streamed split; everything but `take` and `load` is passed through.
        locate_fn: FieldError -> the UserError to raise (e.g. `Config.error_at`, file:line).
    """

    def __init__(self, split: SplitLike, locate_fn: Callable[[FieldError], UserError]) -> None:
        self.split, self.locate_fn = split, locate_fn

    def __len__(self) -> int:
        return len(self.split)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.split.example_shape

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return self.split.x_dtype

    @property
    def nbytes(self) -> int:
        return self.split.nbytes

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.split.take(idx)
        except FieldError as e:
            raise self.locate_fn(e) from e.__cause__

    def load(self) -> Split:
        try:
            return self.split.load()  # type: ignore[attr-defined, no-any-return]
        except FieldError as e:
            raise self.locate_fn(e) from e.__cause__

    def __getattr__(self, name: str) -> Any:
        # Optional members (`batch_indices`, `auto_host`) exactly as the wrapped split has them.
        return getattr(self.split, name)


@dataclass(frozen=True)
class Dataset:
    """A train and an eval split plus what the model and the step need to know about them."""

    name: str
    train: SplitLike
    eval: SplitLike
    num_classes: int
    # Integer inputs are multiplied by this on the device after the cast to float32;
    # None means x is already float32 and used as is.
    x_scale: float | None
    # Token data sets: x holds integer token ids that the model embeds (never cast to float),
    # y the next token at every position; num_classes is the vocabulary size.
    tokens: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.example_shape


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically pick `fraction` of n examples (at least one) for evaluation.

    Returns:
        (train, eval) sorted int64 index arrays that together hold 0..n-1 once each.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, round(n * fraction))
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[Split, Split]:
    """Deterministically split off `fraction` of the examples for evaluation."""
    tr, ev = holdout_indices(len(y), fraction, seed)
    return Split(x[tr], y[tr]), Split(x[ev], y[ev])


def load_digits(cfg: Any) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16), no download needed."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.images.astype(np.uint8)[..., None]  # (N, 8, 8, 1), integer values 0..16
    y = bunch.target.astype(np.int32)
    train, ev = _holdout(x, y, cfg.eval_fraction, cfg.split_seed)
    return Dataset("digits", train, ev, num_classes=10, x_scale=1.0 / 16.0)


def synthetic_bytes(num: int, shape: tuple[int, ...], dtype: str, num_classes: int) -> int:
    """Peak host bytes `make_synthetic` takes for `num` examples: the inputs, for uint8 inputs
    also the float32 features the labels are computed from (two alive at once), the teacher and
    its logits, and the labels."""
    features = math.prod(shape)
    if dtype == "uint8":
        inputs = num * features * (1 + 2 * 4)
    else:  # float32; the features are a view of the inputs
        inputs = num * features * 4
    return inputs + features * num_classes * 4 + num * (num_classes * 4 + 8 + 4)


def _check_synthetic_size(cfg: Any) -> None:
    """Refuse, before generating anything, a synthetic set the host memory cannot hold; the
    error sits at the larger of data.num_train and data.num_eval."""
    n = cfg.num_train + cfg.num_eval
    need = synthetic_bytes(n, tuple(cfg.shape), cfg.dtype, cfg.num_classes)
    field = "num_train" if cfg.num_train >= cfg.num_eval else "num_eval"
    check_host_bytes(
        need,
        path=("data", field),
        what=f"{n:,} examples (num_train + num_eval) of shape {list(cfg.shape)} ({cfg.dtype})",
        fix_fn=lambda share: (
            f"Lower data.{field} (at most about {int(n * share):,} examples in all fit) or "
            "data.shape."
        ),
    )


def make_synthetic(cfg: Any) -> Dataset:
    """Random inputs with labels from a fixed random linear teacher (learnable, any shape).

    Raises:
        FieldError: on data.num_train (or num_eval): the set does not fit the host memory
            available now (checked before anything is generated).
    """
    _check_synthetic_size(cfg)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_train + cfg.num_eval
    if cfg.dtype == "uint8":
        x = rng.integers(0, 256, size=(n, *cfg.shape), dtype=np.uint8)
        feats = x.reshape(n, -1).astype(np.float32) / 255.0 - 0.5
        scale: float | None = 1.0 / 255.0
    else:
        x = rng.standard_normal(size=(n, *cfg.shape), dtype=np.float32)
        feats = x.reshape(n, -1)
        scale = None
    teacher = rng.standard_normal((feats.shape[1], cfg.num_classes), dtype=np.float32)
    y = np.argmax(feats @ teacher, axis=1).astype(np.int32)
    tr, ev = slice(0, cfg.num_train), slice(cfg.num_train, n)
    return Dataset(
        "synthetic", Split(x[tr], y[tr]), Split(x[ev], y[ev]), cfg.num_classes, x_scale=scale
    )


def load_npz(cfg: Any) -> Dataset:
    """A user's arrays in a .npz file (see data/npz.py)."""
    from accelctl.data import npz

    return npz.load_npz(cfg)


def load_tfds(cfg: Any) -> Dataset:
    """A tensorflow-datasets image-classification set (imported only when used)."""
    from accelctl.data import tfds_source

    return tfds_source.load(cfg)


def load_tokens(cfg: Any) -> Dataset:
    """Token sequences (synthetic Markov chain, byte-level text, a .bin corpus) for the
    transformer."""
    from accelctl.data import tokens  # imports this module: loaded when used, not at import

    return tokens.load_tokens(cfg)


def load_python(cfg: Any, obj: Any = None) -> Dataset:
    """The user's own loader, by import path or given as `obj` (see data/python_source.py)."""
    from accelctl.data import python_source

    return python_source.load(cfg, obj)


SOURCES = {
    "digits": load_digits,
    "synthetic": make_synthetic,
    "npz": load_npz,
    "tfds": load_tfds,
    "tokens": load_tokens,
    "python": load_python,
}
