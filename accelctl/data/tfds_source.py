"""tensorflow-datasets image-classification sets, read with random access (`tfds.data_source`).

Opening a data set never downloads: one that is not prepared gives a `UserError` naming the data
set, the folder searched and the command that prepares it. Reads are batched (`__getitems__` over
ArrayRecord, which fetches the records in parallel) and decoded in a thread pool; images stay in
their stored dtype (uint8) and are scaled on the device. `prepare()` and `list_prepared()` back
`accelctl data prepare` and `accelctl data ls`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from accelctl.data.sources import Dataset, Split
from accelctl.errors import FieldError, UserError
from accelctl.installation import pip_install_hint

RANDOM_ACCESS_FORMATS = ("array_record",)


def data_dir_of(data_dir: str | None) -> Path:
    """Return the folder tfds reads: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def import_tfds() -> Any:
    """Import tensorflow_datasets, or explain how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"tensorflow-datasets is not importable ({e}); install it with "
            f"`{pip_install_hint('tfds')}`"
        ) from None
    # tfds warns through absl about folders it probes (e.g. "no dataset_info.json" for a data
    # set that is not prepared); accelctl reports those cases itself, in one message.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds


def prepare_hint(name: str, data_dir: Path) -> str:
    """Return the sentence telling a user how to get `name` prepared under `data_dir`."""
    base = name.split(":")[0]
    return (
        f"Prepare it with `accelctl data prepare {name} --data-dir {data_dir}` (needs internet "
        f"access and the tfds extra), or copy a prepared `{base}` folder from another machine's "
        f"tensorflow_datasets directory into {data_dir}."
    )


def open_builder(name: str, data_dir: Path, **kwargs: Any) -> Any:
    """Return the tfds builder of `name` reading `data_dir` (no download).

    Raises:
        UserError: unknown data set name (with the closest registered names) or bad version.
    """
    tfds = import_tfds()
    try:
        return tfds.builder(name, data_dir=str(data_dir), **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split(":")[0].split("/")[0]
        close = difflib.get_close_matches(
            base, tfds.list_builders(with_community_datasets=False), n=3
        )
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FieldError(
            ("data", "name"),
            f"tensorflow-datasets has no data set {name!r} (nothing registered and "
            f"nothing prepared under {data_dir}).{hint}",
        ) from None
    except (ValueError, AssertionError) as e:
        raise FieldError(("data", "name"), f"cannot open {name!r} under {data_dir}: {e}") from None


def _feature_layout(builder: Any, cfg: Any) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Return (image shape, image dtype, number of classes), checking the features fit."""
    feats = builder.info.features
    keys = ", ".join(sorted(feats.keys()))
    for field, key in (("image_key", cfg.image_key), ("label_key", cfg.label_key)):
        if key not in feats:
            raise FieldError(
                ("data", field),
                f"{cfg.name} has no feature {key!r} (it has: {keys}); set "
                f"data.{field} to the right one",
            )
    image, label = feats[cfg.image_key], feats[cfg.label_key]
    shape = tuple(getattr(image, "shape", ()) or ())
    if not shape or any(d is None for d in shape):
        raise FieldError(
            ("data", "image_key"),
            f"{cfg.name}'s {cfg.image_key!r} has shape {shape or 'unknown'}; "
            "accelctl needs images of one fixed size (pick a fixed-size variant of the data set)",
        )
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise FieldError(
            ("data", "label_key"),
            f"{cfg.name}'s {cfg.label_key!r} is a {type(label).__name__}, not a "
            "ClassLabel; accelctl trains image classifiers",
        )
    return tuple(int(d) for d in shape), np.dtype(image.np_dtype), int(num_classes)


def _open_source(builder: Any, cfg: Any, split: str, field: str, data_dir: Path) -> Any:
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # tfds raises many types here; each is turned into advice below
        if not builder.is_prepared():
            raise FieldError(
                ("data", "name"),
                f"data set {cfg.name!r} is not prepared under {data_dir} (looked for "
                f"{builder.data_dir}). {prepare_hint(cfg.name, data_dir)}",
            ) from None
        fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
        if fmt not in RANDOM_ACCESS_FORMATS:
            raise FieldError(
                ("data", "name"),
                f"{cfg.name} under {data_dir} is stored as {fmt}, which has no random "
                "access; re-prepare it as ArrayRecord with `accelctl data prepare "
                f"{cfg.name} --data-dir {data_dir}` in a fresh data dir",
            ) from None
        raise FieldError(
            ("data", field), f"cannot read split {split!r} of {cfg.name}: {e}"
        ) from None


class TfdsSplit:
    """A tfds split read on demand: `take(idx)` fetches and decodes just those examples.

    Args:
        source: the tfds random-access data source of the split.
        image_key, label_key: feature names.
        example_shape, x_dtype: layout of one image.
        threads: reads/decodes run in this many threads (decoding releases the GIL).
    """

    def __init__(
        self,
        source: Any,
        *,
        image_key: str,
        label_key: str,
        example_shape: tuple[int, ...],
        x_dtype: np.dtype[Any],
        threads: int,
    ) -> None:
        self.source = source
        self.image_key, self.label_key = image_key, label_key
        self._shape, self._dtype = example_shape, x_dtype
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def x_dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return len(self) * (math.prod(self._shape) * self._dtype.itemsize + 4)

    def _read(self, keys: np.ndarray) -> list[dict[str, Any]]:
        return list(self.source.__getitems__([int(k) for k in keys]))

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (images, int32 labels) of the examples at `idx`, in that order."""
        idx = np.asarray(idx)
        chunks = max(1, min(self.threads, len(idx) // 32))
        if chunks == 1:
            records = self._read(idx)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="accelctl-tfds")
            parts = self._pool.map(self._read, np.array_split(idx, chunks))
            records = [r for part in parts for r in part]
        x = np.empty((len(idx), *self._shape), self._dtype)
        y = np.empty((len(idx),), np.int32)
        for j, rec in enumerate(records):
            x[j] = rec[self.image_key]
            y[j] = rec[self.label_key]
        return x, y

    def load(self, chunk: int = 8192) -> Split:
        """Read and decode the whole split into host memory."""
        n = len(self)
        x = np.empty((n, *self._shape), self._dtype)
        y = np.empty((n,), np.int32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            x[start:stop], y[start:stop] = self.take(np.arange(start, stop))
        return Split(x, y)


def load(cfg: Any) -> Dataset:
    """Open the `data` section's tfds data set: both splits, read lazily (see `TfdsSplit.load`)."""
    data_dir = data_dir_of(cfg.data_dir)
    builder = open_builder(cfg.name, data_dir)
    shape, dtype, num_classes = _feature_layout(builder, cfg)
    splits = []
    for field in ("train_split", "eval_split"):
        source = _open_source(builder, cfg, getattr(cfg, field), field, data_dir)
        if len(source) == 0:
            raise FieldError(
                ("data", field), f"split {getattr(cfg, field)!r} of {cfg.name} is empty"
            )
        splits.append(
            TfdsSplit(
                source,
                image_key=cfg.image_key,
                label_key=cfg.label_key,
                example_shape=shape,
                x_dtype=dtype,
                threads=cfg.read_threads,
            )
        )
    x_scale = 1.0 / 255.0 if dtype == np.uint8 else None
    return Dataset(cfg.name, splits[0], splits[1], num_classes, x_scale=x_scale)


def prepare(name: str, data_dir: str | None) -> dict[str, Any]:
    """Download and prepare `name` as ArrayRecord under `data_dir` (what `data prepare` runs).

    Returns:
        {"name", "data_dir", "path", "already_prepared", "splits": {split: examples}}.
    Raises:
        UserError: unknown name, TensorFlow missing (tfds needs it to prepare), download failed.
    """
    root = data_dir_of(data_dir)
    try:
        builder = open_builder(name, root, file_format="array_record")
    except FieldError as e:  # no config here: the name came from the command line
        raise UserError(e.message) from None
    already = bool(builder.is_prepared())
    if not already:
        offline = (
            f"If this machine is offline, prepare it elsewhere with `accelctl data prepare "
            f"{name} --data-dir DIR` and copy DIR/{name.split(':')[0]} into {root}."
        )
        # Both checks come before tfds prints or creates anything.
        if importlib.util.find_spec("tensorflow") is None:
            raise UserError(
                f"preparing {name} needs TensorFlow (tensorflow-datasets prepares data sets "
                f"with it), which is not installed; install it with "
                f"`{pip_install_hint('tfds')}`. {offline}"
            )
        unreachable = _unreachable()
        if unreachable:
            raise UserError(
                f"cannot download {name}: this machine reaches none of the hosts data sets are "
                f"downloaded from ({unreachable}). {offline}"
            )
        before = _entries(root)
        try:
            builder.download_and_prepare()
        except ImportError as e:
            _clean_up(root, before)
            raise UserError(
                f"preparing {name} needs packages that are not installed ({e}); install them "
                f"with `{pip_install_hint('tfds')}` (tensorflow-datasets prepares data sets "
                "with TensorFlow)"
            ) from None
        except Exception as e:  # network and I/O failures surface as many types
            _clean_up(root, before)
            raise UserError(
                f"could not download and prepare {name} into {root}: {type(e).__name__}: {e}. "
                + offline
            ) from None
    splits = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
    return {
        "name": name,
        "data_dir": str(root),
        "path": str(builder.data_dir),
        "already_prepared": already,
        "splits": splits,
    }


# Where tfds downloads its data sets from (Google Cloud Storage, and the sets' own sites).
_PROBE_HOSTS = ("storage.googleapis.com", "huggingface.co", "github.com")


def _unreachable(timeout: float = 3.0) -> str | None:
    """None when one of the download hosts (or the configured HTTPS proxy) accepts a TCP
    connection within `timeout` seconds; else what failed, in a few words."""
    import socket
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    targets = [(u.hostname, u.port or 443)] if proxy and (u := urlparse(proxy)).hostname else []
    targets = targets or [(host, 443) for host in _PROBE_HOSTS]
    failures = []
    for host, port in targets:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return None
        except OSError as e:
            failures.append(f"{host}:{port}: {e.strerror or type(e).__name__}")
    return "; ".join(failures)


def _entries(root: Path) -> set[Path]:
    """What is in the data folder now (top level and downloads/), to tell new entries apart."""
    if not root.is_dir():
        return set()
    found = set(root.iterdir())
    downloads = root / "downloads"
    if downloads.is_dir():
        found |= set(downloads.iterdir())
    return found


def _clean_up(root: Path, before: set[Path]) -> None:
    """Remove what a failed preparation created (partial downloads, an empty data set folder);
    anything that was there before stays."""
    import shutil

    for path in sorted(_entries(root) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    downloads = root / "downloads"
    if downloads not in before and downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()


def list_prepared(data_dir: str | None) -> list[dict[str, Any]]:
    """List the prepared data sets under `data_dir` (reads dataset_info.json; no tfds import).

    Returns:
        One dict per prepared version: name, config, version, path, file_format, random_access,
        splits {name: examples}, bytes.
    """
    root = data_dir_of(data_dir)
    found = []
    for info_path in sorted(root.glob("*/*/dataset_info.json")) + sorted(
        root.glob("*/*/*/dataset_info.json")
    ):
        rel = info_path.parent.relative_to(root).parts
        if rel[0] == "downloads" or any(p.startswith("incomplete") for p in rel):
            continue
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        splits = {
            s.get("name", "?"): sum(int(n) for n in s.get("shardLengths", []))
            for s in info.get("splits", [])
        }
        fmt = info.get("fileFormat", "tfrecord")
        found.append(
            {
                "name": rel[0],
                "config": rel[1] if len(rel) == 3 else None,
                "version": rel[-1],
                "path": str(info_path.parent),
                "file_format": fmt,
                "random_access": fmt in RANDOM_ACCESS_FORMATS,
                "splits": splits,
                "bytes": sum(int(s.get("numBytes", 0)) for s in info.get("splits", [])),
            }
        )
    return found
