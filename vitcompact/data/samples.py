"""The images of one split, read one at a time: held in memory as a uint8 tensor (the small
built-in sources) or as files decoded only when a sample is asked for (image folders), so memory
stays flat however many files a folder holds."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..io import regular_file

# Largest image an image folder may hold: 4096 x 4096 pixels (48 MiB decoded as RGB). Far above
# what a ViT is fed (images are resized to the model's input), far below a decompression bomb.
# Checked from the image header, before the pixels are decoded.
MAX_IMAGE_PIXELS = 4096 * 4096


class Samples(Protocol):
    """A split: `labels` (int64 [N]), `image(i)` as a PIL image, `take(index)` a subset."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def image(self, i: int) -> Image.Image: ...

    def take(self, index: torch.Tensor) -> "Samples": ...


@dataclass
class TensorSamples:
    """Images held in memory as uint8 `[N, C, H, W]` (C is 1 or 3)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        pixels = self.images[i]
        if pixels.shape[0] == 1:
            return Image.fromarray(pixels[0].numpy(), "L")
        return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")

    def take(self, index: torch.Tensor) -> "TensorSamples":
        return TensorSamples(self.images[index], self.labels[index])


@dataclass
class FileSamples:
    """Image files, decoded (and checked) one at a time, when a sample is asked for."""

    paths: list[Path]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return decode_image(self.paths[i])

    def take(self, index: torch.Tensor) -> "FileSamples":
        return FileSamples([self.paths[i] for i in index.tolist()], self.labels[index])


def decode_image(path: Path) -> Image.Image:
    """One image file as a decoded RGB PIL image; a corrupt, oversized or unreadable file is a
    DataError naming it. The size is checked from the header, before the pixels are decoded."""
    return _checked(path, decode=True)


def check_image(path: Path) -> None:
    """Refuse a file that is not an image, or one too large, from its header alone (fast: nothing
    is decoded). A file whose pixels are corrupt is found when it is decoded."""
    _checked(path, decode=False)


def _checked(path: Path, decode: bool) -> Image.Image | None:
    regular_file(path, DataError)
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own limit and twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path} is {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_IMAGE_PIXELS:,} vitcompact decodes; resize it first")
                return im.convert("RGB") if decode else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path} is refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"{path} is corrupt or not an image: {e}") from None
