"""A folder of PNG images as a random-access source for `data: {source: python}`.

`load(root)` returns {"train": PngFolder(root/train), "eval": PngFolder(root/test)} (without a
test/ folder only "train": accelctl then holds out data.eval_fraction of it). Each image's class is
the name of its sub-folder, e.g. root/train/3/0042.png is a 3. Nothing is read up front:
`__getitem__` opens and decodes one file, so accelctl reads only the rows of each batch, in its
prefetch thread, with data.read_threads threads (Pillow releases the GIL while decoding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class PngFolder:
    """The PNG files under root/<class>/, in a fixed order (sorted paths).

    Args:
        root: folder holding one sub-folder per class. Sub-folders named by integers (0, 1, ...)
            are those class ids; other names are numbered in sorted order.
        grayscale: decode to (H, W, 1) instead of (H, W, 3).
    """

    def __init__(self, root: Path, *, grayscale: bool = True) -> None:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"{root} has no class sub-folders (root/<class>/*.png)")
        names = [p.name for p in folders]
        ids = (
            [int(n) for n in names] if all(n.isdigit() for n in names) else list(range(len(names)))
        )
        self.files: list[Path] = []
        self.labels: list[int] = []
        for folder, class_id in zip(folders, ids, strict=True):
            for f in sorted(folder.glob("*.png")):
                self.files.append(f)
                self.labels.append(class_id)
        self.mode = "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | int]:
        with Image.open(self.files[i]) as image:
            pixels = np.asarray(image.convert(self.mode), dtype=np.uint8)
        if self.mode == "L":
            pixels = pixels[..., None]  # (H, W) -> (H, W, 1): the channel axis models expect
        return {"image": pixels, "label": self.labels[i]}


def load(root: str, grayscale: bool = True) -> dict[str, PngFolder]:
    """The loader accelctl calls with data.args.

    Args:
        root: the folder make_pngs.py wrote (train/ and optionally test/); a relative path is
            taken from this file's folder, so the config works from any working directory.
        grayscale: see PngFolder.
    """
    base = Path(root).expanduser()
    if not base.is_absolute():
        base = Path(__file__).parent / base
    if not (base / "train").is_dir():
        raise FileNotFoundError(
            f"{base / 'train'} does not exist; write the PNGs first: python make_pngs.py {base}"
        )
    splits = {"train": PngFolder(base / "train", grayscale=grayscale)}
    if (base / "test").is_dir():
        splits["eval"] = PngFolder(base / "test", grayscale=grayscale)
    return splits
