"""Write scikit-learn's bundled 8x8 digits (no download) as a folder of PNG files.

    python make_pngs.py [OUT]        # default OUT: pngs/ beside this file

Layout (what data.py reads): OUT/train/<class>/<n>.png and OUT/test/<class>/<n>.png, grayscale,
pixel values 0..16 stretched to 0..255; a seeded fifth of the images goes to test/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

TEST_FRACTION = 0.2


def write_pngs(out: Path, *, seed: int = 0) -> dict[str, int]:
    """Write the digits under `out`; returns the number of images per split."""
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    test = np.random.default_rng(seed).random(len(images)) < TEST_FRACTION
    counts = {"train": 0, "test": 0}
    for n, (image, label, is_test) in enumerate(zip(images, digits.target, test, strict=True)):
        split = "test" if is_test else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:04d}.png")
        counts[split] += 1
    return counts


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "pngs"
    counts = write_pngs(target)
    print(f"wrote {counts['train']} training and {counts['test']} test PNGs under {target}")
