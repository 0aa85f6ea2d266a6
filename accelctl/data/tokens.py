"""Token sequences for next-token prediction: a synthetic Markov chain, a byte-level text file, or
a pre-tokenised `.bin` corpus (data/tokens_bin.py).

Each example is a window of T + 1 tokens: x = window[:-1] and y = window[1:], both (T,) int32, so
the model's logit at position t is trained to predict token t + 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from accelctl.data.checks import check_data_file
from accelctl.data.sources import Dataset, Split
from accelctl.data.tokens_bin import load_bin_tokens
from accelctl.errors import FieldError
from accelctl.memory import check_host_bytes

SYNTHETIC_TRAIN = 4096  # sequences generated when num_train / num_eval are null
SYNTHETIC_EVAL = 256
SUCCESSORS = 4  # tokens that may follow each token in the synthetic chain
BYTE_VOCAB = 256


def _windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut non-overlapping windows of seq_len + 1 tokens; return x, y (N, seq_len) int32."""
    n = len(tokens) // (seq_len + 1)
    w = tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)
    return w[:, :-1], w[:, 1:]


def markov_sequences(
    num: int, length: int, vocab_size: int, *, rng: np.random.Generator, table_seed: int
) -> np.ndarray:
    """Sample `num` sequences of `length` tokens from a fixed random first-order Markov chain.

    Every token has up to `SUCCESSORS` possible next tokens with Dirichlet(1) probabilities, so the
    next-token entropy (about 1 nat) is far below uniform's log(vocab_size) and a model can learn
    it; the table is V x 4 rather than V x V, so GPT-2's 50257 tokens stay cheap.

    Args:
        num: sequences.
        length: tokens per sequence; the first token is uniform.
        vocab_size: V.
        rng: draws the sequences.
        table_seed: seeds the chain itself (the same for the train and eval sequences).
    Returns:
        (num, length) int32 token ids in [0, vocab_size).
    """
    table_rng = np.random.default_rng(table_seed)
    k = min(SUCCESSORS, vocab_size)
    # Repeated successors only merge their probabilities; drawing them independently is cheap.
    succ = table_rng.integers(0, vocab_size, size=(vocab_size, k))
    cum = np.cumsum(table_rng.dirichlet(np.ones(k), size=vocab_size), axis=1)
    out = np.empty((num, length), np.int32)
    out[:, 0] = rng.integers(0, vocab_size, num)
    for t in range(1, length):
        prev = out[:, t - 1]
        choice = (rng.random(num)[:, None] > cum[prev]).sum(axis=1).clip(max=k - 1)
        out[:, t] = succ[prev, choice]
    return out


def synthetic_token_bytes(num: int, seq_len: int, vocab_size: int) -> int:
    """Peak host bytes `make_synthetic_tokens` takes: the sampled (num, seq_len + 1) int32
    tokens, plus while sampling the chain's table (int64 successors, float64 probabilities)
    and each step's per-sequence temporaries, or afterwards the contiguous x and y copies of
    the splits, whichever is larger."""
    k = min(SUCCESSORS, vocab_size)
    sampling = vocab_size * k * (8 + 8 + 8) + num * (8 + k * 9 + 16)
    copies = 2 * num * seq_len * 4
    return num * (seq_len + 1) * 4 + max(sampling, copies)


def make_synthetic_tokens(cfg: Any) -> Dataset:
    """Train and eval sequences from one seeded Markov chain (independent sequences).

    Raises:
        FieldError: on data.num_train (or num_eval, or seq_len when both are defaults): the
            sequences do not fit the host memory available now (checked before sampling).
    """
    n_train = cfg.num_train or SYNTHETIC_TRAIN
    n_eval = cfg.num_eval or SYNTHETIC_EVAL
    n = n_train + n_eval
    if cfg.num_train is None and cfg.num_eval is None:
        field = "seq_len"
    else:
        field = "num_train" if n_train >= n_eval else "num_eval"
    check_host_bytes(
        synthetic_token_bytes(n, cfg.seq_len, cfg.vocab_size),
        path=("data", field),
        what=f"{n:,} sequences (num_train + num_eval) of seq_len + 1 = {cfg.seq_len + 1} tokens "
        f"from a vocabulary of {cfg.vocab_size:,}",
        fix_fn=lambda share: (
            f"Lower data.{field} (at most about {int(n * share):,} sequences in all fit) "
            "or data.seq_len."
            if field != "seq_len"
            else f"Lower data.seq_len (at most about {int(cfg.seq_len * share):,} fit)."
        ),
    )
    rng = np.random.default_rng([cfg.seed, 1])
    seqs = markov_sequences(
        n_train + n_eval, cfg.seq_len + 1, cfg.vocab_size, rng=rng, table_seed=cfg.seed
    )
    x, y = seqs[:, :-1], seqs[:, 1:]
    train = Split(np.ascontiguousarray(x[:n_train]), np.ascontiguousarray(y[:n_train]))
    ev = Split(np.ascontiguousarray(x[n_train:]), np.ascontiguousarray(y[n_train:]))
    return Dataset(
        "synthetic-tokens", train, ev, num_classes=cfg.vocab_size, x_scale=None, tokens=True
    )


def _take(x: np.ndarray, y: np.ndarray, num: int | None, field: str, path: Path) -> Split:
    if num is not None and num > len(x):
        raise FieldError(
            ("data", field),
            f"{num} sequences asked for, but {path} gives only {len(x)} windows of "
            f"seq_len + 1 bytes there; lower data.{field} or set it to null (all)",
        )
    return Split(x[:num], y[:num])


def _eval_bytes(size: int, fraction: float) -> int:
    return round(size * fraction)


def min_text_bytes(seq_len: int, eval_fraction: float) -> int:
    """The shortest file that gives one training and one eval window of seq_len + 1 bytes."""
    w = seq_len + 1

    def enough(size: int) -> bool:
        n_eval = _eval_bytes(size, eval_fraction)
        return n_eval >= w and size - n_eval >= w

    # Both parts grow with the size, so the first size that is enough is the answer; the
    # search starts just below the bound that rounding allows (a few steps at most).
    size = max(2 * w, int((w - 0.5) / eval_fraction) - 1, int((w - 0.5) / (1 - eval_fraction)) - 1)
    while not enough(size):
        size += 1
    return size


def load_text_tokens(cfg: Any) -> Dataset:
    """A text file as bytes: the first (1 - eval_fraction) of it trains, the rest evaluates.

    Raises:
        FieldError: on data.path: the file is missing, not a regular file, unreadable, or
            shorter than one training and one eval window (the message says how long it must
            be); on data.num_train / num_eval: more windows asked for than the file gives.
    """
    path = Path(cfg.path)
    fix = "Set data.path to a text file to train on."
    size = check_data_file(path, "path", fix)
    t, f = cfg.seq_len, cfg.eval_fraction
    need = min_text_bytes(t, f)
    # Checked from the size before reading, so a too-short file is reported without loading it.
    if size < need:
        what = "is empty" if size == 0 else f"has {size} bytes"
        raise FieldError(
            ("data", "path"),
            f"{path} {what}: too short for one training and one eval window of "
            f"seq_len + 1 = {t + 1} bytes with eval_fraction {f}; it needs at least {need} "
            "bytes. Use a longer file or lower data.seq_len.",
        )
    # The bytes, then one int32 token id per byte for the windows.
    check_host_bytes(
        size * 5,
        path=("data", "path"),
        what=f"{path} ({size:,} bytes, read as {size:,} int32 token ids)",
        fix_fn=lambda share: (
            f"Use a shorter file (at most about {int(size * share):,} bytes fit) or a "
            "pre-tokenised corpus (data.kind: bin), which is memory-mapped instead of read."
        ),
    )
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except OSError as e:
        raise FieldError(
            ("data", "path"), f"{path} could not be read ({e}); check its permissions."
        ) from None
    n_eval_bytes = _eval_bytes(len(data), f)
    # The split is by position, so no eval byte is ever trained on.
    train_x, train_y = _windows(data[: len(data) - n_eval_bytes], t)
    eval_x, eval_y = _windows(data[len(data) - n_eval_bytes :], t)
    train = _take(train_x, train_y, cfg.num_train, "num_train", path)
    ev = _take(eval_x, eval_y, cfg.num_eval, "num_eval", path)
    return Dataset(path.stem, train, ev, num_classes=BYTE_VOCAB, x_scale=None, tokens=True)


def load_tokens(cfg: Any) -> Dataset:
    """The `tokens` source: synthetic Markov sequences, a byte-level text file or a .bin corpus.

    Returns:
        Dataset with x, y (N, seq_len) int32 (y = x shifted left by one), num_classes = the
        vocabulary size and tokens=True.
    Raises:
        FieldError: the text or .bin file is missing, unreadable, too short or malformed.
    """
    if cfg.kind == "bin":
        return load_bin_tokens(cfg)
    return load_text_tokens(cfg) if cfg.kind == "text" else make_synthetic_tokens(cfg)
