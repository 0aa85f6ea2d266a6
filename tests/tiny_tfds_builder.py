"""A tiny tfds image-classification data set, prepared for real as ArrayRecord without TensorFlow.

Importing this module registers the builder name `tiny_images` with tensorflow-datasets (once per
test session). Images are `tfds.features.Tensor` (a `tfds.features.Image` would need TensorFlow
to encode). Shuffling is disabled, so record i of a split is the i-th generated example and
`examples(split)` gives the exact arrays a reader must return. A prepared folder is readable in a
fresh process that never imports this module: tfds falls back to its dataset_info.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_images"
VERSION = "1.0.0"
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3
# 200 training examples: enough for `TfdsSplit.take` to split a read over several threads
# (it does when len(idx) // 32 > 1).
SPLITS = {"train": (200, 0), "test": (12, 1)}  # split: (examples, seed)


def examples(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 8, 8, 1), labels int32 (N,)) of `split`, in record order."""
    n, seed = SPLITS[split]
    rng = np.random.default_rng(seed)
    x = np.empty((n, *IMAGE_SHAPE), np.uint8)
    y = np.empty((n,), np.int32)
    for i in range(n):
        x[i] = rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)
        y[i] = rng.integers(0, NUM_CLASSES)
    return x, y


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """200 train / 12 test random 8x8x1 uint8 images, 3 classes."""

    VERSION = tfds.core.Version(VERSION)
    # No code folder (so no checksums file to look for): tfds' `code_path` of a builder defined
    # in a package checks `importlib_resources`, which only the `accelctl[tfds]` extra installs.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the generation order, so record i is example i
        )

    def _split_generators(self, dl_manager):  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        x, y = examples(split)
        for i in range(len(y)):
            yield i, {"image": x[i], "label": int(y[i])}


def prepare(data_dir: Path) -> Path:
    """Prepare the data set as ArrayRecord under `data_dir`; return its version folder."""
    builder = TinyImages(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
