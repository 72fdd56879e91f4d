"""`load_data`: a source's images resized to the model's input, normalised, split, as DataLoaders.

The validation split comes off the training set with a fixed seed; the test set is only for the
final report (nothing in vitcompact selects or scores on it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import validate
from ..errors import ConfigError, DataError
from ..models.adapter import input_size
from ..models.args import MAX_CHANNELS, MAX_IMG_SIZE
from ..validate import in_range, integer
from .sources import DATA_SOURCES


class ImageDataset(Dataset):
    """uint8 images held in memory; normalised (and lightly augmented) a whole batch at a time.

    `__getitems__` serves a batch of indices with one tensor operation per step (the DataLoader
    calls it instead of `__getitem__` per sample, and `collate` passes the batch through), so
    small models are not bound by per-sample Python work. Augmentation uses torch's global RNG,
    which the training loop seeds per run so the order and crops repeat exactly (and a resumed
    run matches an uninterrupted one).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, augment: bool = False, flip: bool = False, shift: int | None = None):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.augment, self.flip = augment, flip
        # Default: an eighth of the side (4 px at 32); none below 16 px, where one pixel is a
        # stroke (a 1 px shift of 8 px digits costs half the accuracy of the demo model).
        self.pad = shift if shift is not None else (images.shape[-1] // 8 if images.shape[-1] >= 16 else 0)

    def __len__(self) -> int:
        return len(self.labels)

    def without_augmentation(self) -> "ImageDataset":
        return ImageDataset(self.images, self.labels, self.mean.flatten(), self.std.flatten())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[index].float().div_(255.0)
        if self.augment and self.pad:
            x = _translate(x, self.pad)
        if self.augment and self.flip:
            flipped = torch.rand(len(x)) < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std, self.labels[index]


def _translate(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image of `x` [B, C, H, W] by its own random offset of up to `pad` pixels in
    each direction, filling with zeros (a random crop of the zero-padded image)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def collate(batch):
    """The DataLoader's collate for datasets with `__getitems__`: the batch is already one tensor pair."""
    return batch


@dataclass
class DataBundle:
    """Train / validation / test loaders of one dataset, with what a model and report need."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    source: str = ""

    def calibration(self) -> DataLoader:
        """Training images without augmentation in a fixed order: data for data-driven criteria."""
        ds = self.train.dataset
        base = ds.without_augmentation() if isinstance(ds, ImageDataset) else ds
        return DataLoader(base, batch_size=self.train.batch_size, shuffle=False, collate_fn=self.train.collate_fn)


def _to_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    c = images.shape[1]
    if c == in_chans:
        return images
    if c == 1:
        return images.expand(-1, in_chans, -1, -1)
    if in_chans == 1 and c == 3:
        # ITU-R 601 luma, the usual RGB -> grey conversion.
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to the model's {in_chans} input channels")


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images.contiguous()
    out = []
    for part in images.split(chunk):
        r = F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        out.append(r.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_data(source: str = "digits", root: str | os.PathLike | None = None, img_size: int = 8,
              in_chans: int = 1, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0,
              augment: bool = True, limit: int | None = None, shift: int | None = None) -> DataBundle:
    """Load a built-in source (`DATA_SOURCES`) resized to `img_size` with `in_chans` channels.

    `val_fraction` of the training images (a permutation fixed by `seed`) become the validation
    set. `limit` caps the training pool and the test set (quick runs and tests). Normalisation
    uses the per-channel mean and std of the training split. `augment` turns on random shifts of
    up to `shift` pixels (default: an eighth of the side from 16 px up) and, where the source
    allows it, horizontal flips.
    """
    spec = DATA_SOURCES.get(source)
    in_range("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    integer("img_size", img_size, 1, MAX_IMG_SIZE)
    integer("in_chans", in_chans, 1, MAX_CHANNELS)
    integer("batch_size", batch_size, 1)
    validate.seed("seed", seed)
    if shift is not None:
        integer("shift", shift, 0, img_size - 1, note="less than img_size")
    if limit is not None:
        integer("limit", limit, 2)
    raw = spec.read(Path(root) if root is not None else None)
    order = torch.randperm(len(raw.train_labels), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    n_val = max(1, int(round(len(order) * val_fraction)))
    if n_val >= len(order):
        raise DataError(f"{source}: {len(order)} training images are too few for a validation split")
    train_idx, val_idx = order[n_val:], order[:n_val]
    test_x, test_y = raw.test_images, raw.test_labels
    if limit is not None:
        test_x, test_y = test_x[:limit], test_y[:limit]

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return _resize(_to_channels(images, in_chans), img_size)

    train_x = prepare(raw.train_images[train_idx])
    val_x, test_x = prepare(raw.train_images[val_idx]), prepare(test_x)
    scaled = train_x.float().div(255.0)
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    num_classes = len(raw.class_names)

    def loader(x, y, train: bool) -> DataLoader:
        ds = ImageDataset(x, y, mean, std, augment=augment and train, flip=spec.flip, shift=shift)
        # The trainer re-creates the training loader per epoch with its own seeded order.
        return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=False, collate_fn=collate,
                          generator=torch.Generator().manual_seed(seed) if train else None)

    return DataBundle(loader(train_x, raw.train_labels[train_idx], True),
                      loader(val_x, raw.train_labels[val_idx], False),
                      loader(test_x, test_y, False), num_classes,
                      tuple(float(v) for v in mean), tuple(float(v) for v in std),
                      list(raw.class_names), source)


def load_data_for(model: nn.Module, source: str = "digits", root: str | os.PathLike | None = None,
                  **options) -> DataBundle:
    """`load_data` at `model`'s input (channels and size), refusing data whose class count is not
    the model's; `options` go to `load_data` (batch_size, seed, augment, ...)."""
    in_chans, img_size, _ = input_size(model)
    bundle = load_data(source, root=root, img_size=img_size, in_chans=in_chans, **options)
    if bundle.num_classes != model.num_classes:
        raise ConfigError(f"{source} has {bundle.num_classes} classes but the model has {model.num_classes}; "
                          "pick a model built for this data")
    return bundle
