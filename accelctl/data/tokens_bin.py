"""`tokens` with `kind: bin`: a pre-tokenised corpus as flat token files, never read whole.

nanoGPT's `prepare.py` (and MaxText's preparation) write `train.bin` and `val.bin`: token ids as
a flat array of uint16 (or uint32), no header. Both are memory-mapped read-only, and each batch
maps the file afresh and copies out just its windows, so memory does not grow with the file or
with the pages a long run has touched (nanoGPT re-creates its memmap per batch for the same
reason).

Training examples are windows of T + 1 tokens (x = tokens[i : i+T], y = tokens[i+1 : i+T+1]) at
offsets drawn for each step from `np.random.default_rng([seed, step])` over every valid offset
(nanoGPT's `get_batch`): a pure function of (seed, step), so a resumed run reads exactly the
windows an uninterrupted one would, with no per-epoch table over millions of offsets. An "epoch"
is the steps that read as many tokens as the file holds: `len(split)` is tokens // T, so the
usual steps per epoch (len // batch) is tokens // (batch x T) and `train.epochs` keeps its
meaning. Evaluation reads the first `num_eval` (or all) non-overlapping windows of val.bin, in
order. Every window read is checked against `vocab_size`, naming the file and token position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from accelctl.data.checks import check_data_file, human_bytes
from accelctl.data.sources import Dataset
from accelctl.errors import FieldError

TRAIN_FILE, EVAL_FILE = "train.bin", "val.bin"
CHECK_TOKENS = 1 << 16  # tokens at the start of each file checked when the data set is built


class TokenFile:
    """A flat file of token ids, read a few windows at a time through a memory map.

    Args:
        path: the .bin file.
        dtype: how the ids are stored (uint16 or uint32).
        vocab_size: every id must be below it.
        field: the config field naming the file ("path" or "eval_path"), for errors.
        min_tokens: fewest tokens the file must hold (one window of seq_len + 1).
    Raises:
        FieldError: the file is missing or not a regular file, its size is not a whole number
            of ids, it is too short, or its first ids are not below vocab_size.
    """

    def __init__(
        self, path: Path, dtype: np.dtype[Any], vocab_size: int, field: str, min_tokens: int
    ) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self.vocab_size, self.field = vocab_size, field
        fix = (
            f"Set data.{field} to a flat file of {self.dtype} token ids as nanoGPT's prepare.py "
            "writes them (train.bin / val.bin), or a folder holding train.bin and val.bin."
        )
        size = check_data_file(path, field, fix)
        item = self.dtype.itemsize
        if size % item:
            raise self.error(
                f"is {size} bytes, not a whole number of {item}-byte {self.dtype} token ids: "
                "the file is truncated, or the ids were written with another dtype (set "
                "data.token_dtype to the one prepare.py used)"
            )
        self.num_tokens = size // item
        if self.num_tokens < min_tokens:
            raise self.error(
                f"holds {self.num_tokens} token(s) ({human_bytes(size)}); one window of "
                f"seq_len + 1 = {min_tokens} tokens is needed. Use a longer file or lower "
                "data.seq_len."
            )
        head = min(self.num_tokens, CHECK_TOKENS)
        self.windows(np.zeros(1, np.int64), head)

    def error(self, message: str) -> FieldError:
        return FieldError(("data", self.field), f"{self.path} {message}")

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Return the `length` tokens from each offset in `starts` as (len(starts), length)
        int32, checked to be below vocab_size."""
        out = np.empty((len(starts), length), self.dtype)
        # A fresh read-only map per call: only these windows' pages are touched, and they are
        # unmapped again when it is dropped, so a long run does not accumulate the whole file.
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        try:
            for j, start in enumerate(starts.tolist()):
                out[j] = tokens[start : start + length]
        finally:
            del tokens
        bad = out >= self.vocab_size
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            pos = int(starts[r]) + c
            raise self.error(
                f"holds token id {int(out[r, c])} at token position {pos} (byte offset "
                f"{pos * self.dtype.itemsize}), but vocab_size is {self.vocab_size}: set "
                "data.vocab_size to the tokenizer's vocabulary (e.g. 50257 for GPT-2's; nanoGPT "
                "rounds it up to 50304), or data.token_dtype to the dtype the file was written "
                "with"
            )
        return out.astype(np.int32)


class BinTrainSplit:
    """Training windows of a token file, sampled per step (see the module docstring).

    Args:
        file: the training tokens.
        seq_len: T, tokens per example.
    """

    def __init__(self, file: TokenFile, seq_len: int) -> None:
        self.file, self.seq_len = file, seq_len

    def __len__(self) -> int:
        """Examples per epoch: tokens // T (windows overlap; an epoch reads each token once on
        average)."""
        return self.file.num_tokens // self.seq_len

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int32)

    @property
    def nbytes(self) -> int:
        return self.file.nbytes

    def batch_indices(self, step: int, batch_size: int, *, seed: int) -> np.ndarray:
        """Window offsets of global step `step`: uniform over every valid offset, a pure function
        of (seed, step).

        Returns:
            (batch_size,) int64 token offsets, sorted (each process reads a contiguous part).
        """
        high = self.file.num_tokens - self.seq_len  # offsets whose T + 1 tokens fit the file
        rng = np.random.default_rng([seed, step])
        return np.sort(rng.integers(0, high, size=batch_size))

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return x, y (len(idx), T) int32 of the windows starting at token offsets `idx`."""
        w = self.file.windows(np.asarray(idx, np.int64), self.seq_len + 1)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


class BinEvalSplit:
    """The first `num` non-overlapping windows of a token file, in order.

    Args:
        file: the eval tokens.
        seq_len: T.
        num: windows to use; None = all that fit.
    Raises:
        FieldError: on data.num_eval: more windows than the file holds.
    """

    def __init__(self, file: TokenFile, seq_len: int, num: int | None) -> None:
        self.file, self.seq_len = file, seq_len
        available = file.num_tokens // (seq_len + 1)
        if num is not None and num > available:
            raise FieldError(
                ("data", "num_eval"),
                f"{num} eval sequences asked for, but {file.path} holds {file.num_tokens} tokens: "
                f"{available} windows of seq_len + 1 = {seq_len + 1}; lower data.num_eval or "
                "set it to null (all)",
            )
        self.num = available if num is None else num

    def __len__(self) -> int:
        return self.num

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int32)

    @property
    def nbytes(self) -> int:
        return self.num * (self.seq_len + 1) * self.file.dtype.itemsize

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return x, y (len(idx), T) int32 of windows number `idx`."""
        starts = np.asarray(idx, np.int64) * (self.seq_len + 1)
        w = self.file.windows(starts, self.seq_len + 1)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def _paths(cfg: Any) -> tuple[Path, Path, str]:
    """(train file, eval file, the field that named the eval file)."""
    path = Path(cfg.path).expanduser()
    train = path / TRAIN_FILE if path.is_dir() else path
    if cfg.eval_path is not None:
        return train, Path(cfg.eval_path).expanduser(), "eval_path"
    return train, train.parent / EVAL_FILE, "path"


def load_bin_tokens(cfg: Any) -> Dataset:
    """Open a `.bin` token corpus (`data: {source: tokens, kind: bin}`).

    Returns:
        Dataset(tokens=True, num_classes=vocab_size) with a `BinTrainSplit` (sampled windows,
        never cached) and a `BinEvalSplit`.
    Raises:
        FieldError: on data.path / data.eval_path: a missing, short or malformed file, or ids
            not below vocab_size; on data.num_train / eval_fraction: set, but not used by bin.
    """
    for field in ("num_train", "eval_fraction"):
        if field in cfg.model_fields_set:
            raise FieldError(
                ("data", field),
                "kind: bin does not use it: training windows are sampled from the whole train "
                "file (set train.steps or train.epochs for how much to read) and evaluation "
                "reads val.bin (or data.eval_path); remove it",
            )
    train_path, eval_path, eval_field = _paths(cfg)
    dtype, t = np.dtype(cfg.token_dtype), cfg.seq_len
    train_file = TokenFile(train_path, dtype, cfg.vocab_size, "path", t + 1)
    try:
        eval_file = TokenFile(eval_path, dtype, cfg.vocab_size, eval_field, t + 1)
    except FieldError as e:
        if eval_field == "path" and not eval_path.exists():
            raise FieldError(
                ("data", "path"),
                f"{eval_path} does not exist: kind: bin evaluates on {EVAL_FILE} beside the "
                f"training file; put it there, or name the eval tokens with data.eval_path",
            ) from None
        raise e from None
    name = train_path.parent.name or train_path.stem
    return Dataset(
        name,
        BinTrainSplit(train_file, t),
        BinEvalSplit(eval_file, t, cfg.num_eval),
        num_classes=cfg.vocab_size,
        x_scale=None,
        tokens=True,
    )
