"""A synthetic image folder (`--data imagefolder` layout) for the data benchmarks.

Smooth random images (three octaves of upscaled noise) so each JPEG is the size of a real photo
thumbnail (about 13 KB at 224 px, quality 90) and costs a real decode; a fixed seed makes the
same folder every time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (noise cells per side, amplitude): coarse shapes, mid detail, fine texture.
OCTAVES = ((4, 110), (16, 50), (56, 25))


def _smooth_image(rng: np.random.Generator, size: int) -> Image.Image:
    pixels = np.full((size, size, 3), 128.0, np.float32)
    for cells, amplitude in OCTAVES:
        noise = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        pixels += (np.asarray(noise.resize((size, size), Image.BICUBIC), np.float32) - 128) * amplitude / 128
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_image_folder(root: Path, images: int, classes: int = 10, size: int = 224,
                       test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write `images` training JPEGs (`images // classes` per class) to root/train/<class>/ and
    `test_fraction` as many to root/test/<class>/ (at least one per class); return `root`."""
    rng = np.random.default_rng(seed)
    per_class = {"train": max(1, images // classes), "test": max(1, round(images * test_fraction) // classes)}
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _smooth_image(rng, size).save(folder / f"{i:05d}.jpg", quality=90)
    return root
