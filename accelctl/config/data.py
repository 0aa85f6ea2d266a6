"""The `data` section: one model per source (a union keyed on `source`), plus the options all
sources share: device/host caching, on-device augmentation and normalisation."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from accelctl.config.base import (
    COUNT,
    FINITE,
    INT32_MAX,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    SIZE,
    VOCAB_MAX,
    Count,
    Finite,
    OpenFraction,
    PositiveFinite,
    Section,
    Seed,
    Size,
    Target,
    Text,
)

# A shape's rank: images are (H, W, C); a few more dimensions leave room, hundreds are a typo.
_RANK_MAX = 8
# Per-channel statistics: images have a handful of channels.
_CHANNELS_MAX = 4096


class AugmentConfig(Section):
    crop_padding: Annotated[int, Field(ge=0, le=1024)] = Field(
        0,
        description="Random crop: pad each image by this many zero pixels per side, then crop "
        "back to its size at a random offset (0 to 1024; 0 = off; 4 is usual for CIFAR).",
    )
    flip: bool = Field(False, description="Random horizontal flip with probability 1/2.")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip


class _DataCommon(Section):
    # Each prefetched batch holds device memory; a deep queue only costs memory.
    prefetch: Annotated[int, Field(ge=1, le=256)] = Field(
        2,
        description="Batches kept ready on the devices by the background prefetch thread "
        "(1 to 256).",
    )
    cache: Literal["auto", "device", "host"] = Field(
        "auto",
        description="device: the training split lives on the devices (sharded) and each step "
        "gathers its batch there; host: batches are cut from host memory and prefetched; "
        "auto: device when the split fits in a quarter of device memory, else host.",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Training-time augmentation of image inputs, on device inside the step.",
    )
    mean: tuple[Finite, ...] | None = Field(
        None,
        max_length=_CHANNELS_MAX,
        description=f"Per-channel mean subtracted on device after scaling to [0, 1] "
        f"(one value, or one per channel, at most {_CHANNELS_MAX}; {FINITE}); null = none.",
    )
    std: tuple[PositiveFinite, ...] | None = Field(
        None,
        max_length=_CHANNELS_MAX,
        description=f"Per-channel standard deviation divided out on device ({POSITIVE}); "
        "needs mean.",
    )

    @model_validator(mode="after")
    def _mean_and_std(self) -> _DataCommon:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std (per-channel normalisation), or neither")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(
                f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per "
                "channel for both"
            )
        return self


class _HeldOut(_DataCommon):
    """Sources whose eval examples are a seeded hold-out of one set of examples."""

    eval_fraction: OpenFraction = Field(
        0.2,
        description=f"Fraction held out for evaluation ({OPEN_FRACTION}; deterministic split; "
        "npz: only when eval_path is not given).",
    )
    split_seed: Seed = Field(0, description=f"Seed of the train/eval split ({SEED}).")


class DigitsData(_HeldOut):
    source: Literal["digits"] = Field(
        description="scikit-learn's bundled 8x8 handwritten digits (1797 images, no download)."
    )


class SyntheticData(_DataCommon):
    source: Literal["synthetic"] = Field(
        description="Random inputs; labels from a fixed random linear teacher, so it is learnable."
    )
    shape: tuple[Size, ...] = Field(
        (28, 28, 1),
        max_length=_RANK_MAX,
        description=f"Shape of one example: at most {_RANK_MAX} dimensions of {SIZE} each, at "
        "most 2^31-1 values in all.",
    )
    num_classes: Annotated[int, Field(ge=2, le=VOCAB_MAX)] = Field(
        10, description="Number of classes (2 to 2^24)."
    )
    num_train: Count = Field(4096, description=f"Training examples ({COUNT}).")
    num_eval: Count = Field(1024, description=f"Evaluation examples ({COUNT}).")
    dtype: Literal["uint8", "float32"] = Field(
        "uint8", description="uint8 images are normalised on device; float32 are used as is."
    )
    seed: Seed = Field(0, description=f"Seed of the generated data ({SEED}).")

    @model_validator(mode="after")
    def _shape_size(self) -> SyntheticData:
        # One example is flattened into a (features, classes) teacher matrix and int32 indices.
        if math.prod(self.shape) > INT32_MAX:
            raise ValueError(
                f"shape {list(self.shape)} has {math.prod(self.shape)} values per example; at "
                "most 2^31-1 (2147483647) are allowed, so use smaller dimensions"
            )
        return self


class NpzData(_HeldOut):
    source: Literal["npz"] = Field(description="A user's arrays in a NumPy .npz file.")
    path: Text = Field(description="Path of the .npz file with the training (or all) examples.")
    eval_path: Text | None = Field(
        None, description="Optional .npz with the eval examples; else eval_fraction is held out."
    )
    x_key: Text = Field("x", description="Array name of the inputs, shape (N, ...).")
    y_key: Text = Field("y", description="Array name of the integer class labels, shape (N,).")


class TfdsData(_DataCommon):
    source: Literal["tfds"] = Field(
        description="An image-classification data set of tensorflow-datasets, read with "
        "tfds.data_source (random access over ArrayRecord; prepare it first with "
        "`accelctl data prepare NAME`)."
    )
    name: Text = Field(
        description="tfds name, optionally with config and version: mnist, fashion_mnist, "
        "kmnist, cifar10, cifar100, svhn_cropped, mnist:3.0.1, ..."
    )
    train_split: Text = Field(
        "train", description="Training split; tfds slicing works, e.g. 'train[:90%]'."
    )
    eval_split: Text = Field("test", description="Evaluation split, e.g. 'test' or 'train[90%:]'.")
    data_dir: Text | None = Field(
        None,
        description="Folder holding prepared tfds data sets; null = $TFDS_DATA_DIR or "
        "~/tensorflow_datasets.",
    )
    image_key: Text = Field("image", description="Feature holding the image (fixed shape).")
    label_key: Text = Field("label", description="Feature holding the class label (ClassLabel).")
    cache: Literal["auto", "device", "host", "none"] = Field(
        "auto",
        description="device / host: decode the split once and keep it on the devices / in host "
        "memory; none: read and decode every batch from the ArrayRecord files (data sets "
        "larger than memory); auto: device if it fits in a quarter of device memory, else "
        "host if it fits in half the free host memory, else none.",
    )
    read_threads: Annotated[int, Field(ge=1, le=1024)] = Field(
        8,
        description="Threads that read and decode records, batched reads decoded in parallel "
        "(1 to 1024).",
    )


class PythonData(_HeldOut):
    source: Literal["python"] = Field(
        description="The user's own data: `target` is called with `args` and returns "
        '{"train": TRAIN, "eval": EVAL} (eval optional: then eval_fraction is held out), each '
        "either a tuple of arrays (x, y) or a random-access source (__len__ and __getitem__, "
        "plus __getitems__ when present: tfds data_source, ArrayRecord, Grain) whose rows are "
        "(x, y) tuples or dicts keyed by x_key / y_key."
    )
    target: Target = Field(
        description="package.module:fn or path/to/file.py:fn (relative to the config file's "
        "folder), the loader to call."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the loader (e.g. root: /data)."
    )
    x_key: Text = Field("x", description="Key of the input in dict rows.")
    y_key: Text = Field("y", description="Key of the integer class label (or targets).")
    num_classes: Annotated[int, Field(ge=2, le=VOCAB_MAX)] | None = Field(
        None,
        description="Classes (2 to 2^24); null = the largest label + 1 (for arrays; a "
        "random-access source, which is never read whole, needs it given).",
    )
    cache: Literal["auto", "device", "host", "none"] = Field(
        "auto",
        description="device / host: keep the split on the devices / in host memory (a "
        "random-access source is then read once); none: read every batch from the source in "
        "the prefetch thread; auto: device if it fits in a quarter of device memory, else "
        "host (arrays) or none (a random-access source).",
    )
    read_threads: Annotated[int, Field(ge=1, le=1024)] = Field(
        8, description="Threads that read rows of a random-access source (1 to 1024)."
    )


class TokensData(_DataCommon):
    source: Literal["tokens"] = Field(
        description="Token sequences for next-token prediction (model: transformer): x = tokens "
        "0..T-1, y = tokens 1..T of each window."
    )
    kind: Literal["synthetic", "text", "bin"] = Field(
        "synthetic",
        description="synthetic: sequences from a fixed random Markov chain (learnable, no "
        "files); text: a text file read as bytes (byte-level, vocabulary 256); bin: a "
        "pre-tokenised corpus as written by nanoGPT's and MaxText's preparation scripts (flat "
        "uint16/uint32 token ids, memory-mapped, never read whole).",
    )
    path: Text | None = Field(
        None,
        description="text: the file to read; its last eval_fraction of bytes is the eval set. "
        "bin: a folder holding train.bin and val.bin, or the training .bin file itself.",
    )
    eval_path: Text | None = Field(
        None, description="bin: the eval tokens' .bin file; null = val.bin beside the train file."
    )
    token_dtype: Literal["uint16", "uint32"] = Field(
        "uint16", description="bin: how the token ids are stored (nanoGPT writes uint16)."
    )
    seq_len: Size = Field(
        128, description=f"Tokens per example, T ({SIZE}); must not exceed model.max_len."
    )
    num_train: Count | None = Field(
        None,
        description=f"Training sequences ({COUNT}). synthetic: how many to generate (null = "
        "4096); text: use the first N windows of the training bytes (null = all of them).",
    )
    num_eval: Count | None = Field(
        None,
        description=f"Evaluation sequences ({COUNT}). synthetic: null = 256; text: the first N "
        "windows of the eval bytes (null = all of them).",
    )
    eval_fraction: OpenFraction = Field(
        0.1,
        description=f"text: fraction of the file's bytes, taken from its end, kept for "
        f"evaluation, never trained on ({OPEN_FRACTION}).",
    )
    # Token ids are int32 and the embedding has vocab_size rows.
    vocab_size: Annotated[int, Field(ge=2, le=VOCAB_MAX)] = Field(
        256,
        description="synthetic: number of distinct tokens (2 to 2^24); text is always 256 (bytes).",
    )
    seed: Seed = Field(
        0, description=f"synthetic: seed of the Markov chain and of the sequences ({SEED})."
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> TokensData:
        if self.kind == "text" and self.path is None:
            raise ValueError("kind: text needs path (a text file, read as bytes)")
        if self.kind == "bin" and self.path is None:
            raise ValueError(
                "kind: bin needs path (a folder with train.bin and val.bin, or a .bin)"
            )
        if self.kind == "synthetic" and self.path is not None:
            raise ValueError("path is only read with kind: text or bin; set the kind or drop path")
        if self.kind != "bin" and self.eval_path is not None:
            raise ValueError("eval_path is only read with kind: bin")
        if self.kind == "bin" and "vocab_size" not in self.model_fields_set:
            raise ValueError(
                "kind: bin needs vocab_size: the tokenizer's vocabulary (e.g. 50257 for GPT-2's; "
                "nanoGPT rounds it up to 50304)"
            )
        if self.kind == "bin" and self.token_dtype == "uint16" and self.vocab_size > 65536:
            raise ValueError(
                f"uint16 token ids go up to 65535, but vocab_size is {self.vocab_size}; set "
                "token_dtype: uint32 or lower vocab_size"
            )
        if self.kind == "text" and self.vocab_size != 256:
            raise ValueError(
                f"text is byte-level, so its vocabulary is 256; drop vocab_size "
                f"(got {self.vocab_size})"
            )
        if self.mean is not None or self.augment.enabled:
            raise ValueError("token data takes no mean/std or augment (they apply to images)")
        return self


DataConfig = Annotated[
    DigitsData | SyntheticData | NpzData | TfdsData | TokensData | PythonData,
    Field(discriminator="source"),
]
