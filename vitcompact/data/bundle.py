"""`load_data`: a source's images resized to the model's input, normalised, split, as DataLoaders.

The validation split comes off the training set with a fixed seed (or is the source's own); the
test set is only for the final report (nothing in vitcompact selects or scores on it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset

from .. import validate
from ..errors import ConfigError, DataError
from ..models.args import MAX_CHANNELS, MAX_IMG_SIZE
from ..models.builder import set_num_classes
from ..models.preprocess import CROP_MODES, INTERPOLATIONS, PLAIN, data_config, set_data_config
from ..models.record import get_record
from ..validate import in_range, integer, one_of
from .samples import Samples, TensorSamples
from .sources import DATA_SOURCES, RawData

AUGMENTATIONS = ("none", "light", "randaugment")
# timm's RandAugment policy string (2 ops of magnitude 9, noise 0.5, increasing severity) and the
# random-erasing probability of `--aug randaugment`: the usual settings of timm's ViT recipes.
RANDAUGMENT = "rand-m9-mstd0.5-inc1"
RANDOM_ERASING = 0.25
# The in-memory path holds every resized image; above this many bytes images are resized per
# sample instead (e.g. Fashion-MNIST at 224 px would be 9 GB).
MAX_RESIZED_BYTES = 1 << 30
# Images whose statistics give a new model's normalisation on the per-sample path.
STATS_IMAGES = 1000


class ImageDataset(Dataset):
    """The in-memory path: uint8 images held resized; normalised (and lightly augmented) a whole batch at a time.

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


class TransformDataset(Dataset):
    """Samples decoded one at a time and passed through a torchvision/timm transform: the path of
    image folders (memory stays flat: only the loader's batches are ever decoded), of RandAugment,
    and of any resize too large to hold in memory. Decoding runs in DataLoader workers."""

    def __init__(self, samples: Samples, transform: Callable, eval_transform: Callable, mode: str):
        self.samples, self.transform, self.eval_transform, self.mode = samples, transform, eval_transform, mode
        self.labels = samples.labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.samples.image(i).convert(self.mode)), self.labels[i]

    def without_augmentation(self) -> "TransformDataset":
        return TransformDataset(self.samples, self.eval_transform, self.eval_transform, self.mode)


def without_augmentation(dataset: Dataset) -> Dataset:
    """`dataset`'s images as evaluated, not augmented, also through `Subset`s of it (a dataset
    that does not augment, or says nothing of it, as it is)."""
    if isinstance(dataset, Subset):
        return Subset(without_augmentation(dataset.dataset), dataset.indices)
    return dataset.without_augmentation() if hasattr(dataset, "without_augmentation") else dataset


def collate(batch):
    """The DataLoader's collate for datasets with `__getitems__`: the batch is already one tensor pair."""
    return batch


@dataclass
class DataBundle:
    """Train / validation / test loaders of one dataset, with what a model and report need.
    `preprocessing` is the timm data config the images went through (input_size, interpolation,
    crop_pct, crop_mode, mean, std); `aug` the training augmentation."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    source: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    aug: str = "light"

    def calibration(self) -> DataLoader:
        """Training images without augmentation in a fixed order: data for data-driven criteria."""
        return DataLoader(without_augmentation(self.train.dataset), batch_size=self.train.batch_size, shuffle=False,
                          collate_fn=self.train.collate_fn, num_workers=self.train.num_workers,
                          pin_memory=self.train.pin_memory)


def _to_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    c = images.shape[1]
    if c == in_chans:
        return images
    if c == 1:
        return images.expand(-1, in_chans, -1, -1)
    if in_chans == 1 and c == 3:
        # ITU-R 601 luma, the usual RGB -> grey conversion (PIL's "L" for the per-sample path).
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to the model's {in_chans} input channels")


def _resize(images: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images.contiguous()
    out = []
    for part in images.split(chunk):
        r = F.interpolate(part.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(r.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def transforms(preprocessing: dict[str, Any], aug: str, flip: bool, pad: int) -> tuple[Callable, Callable]:
    """The (training, evaluation) transforms of the per-sample path, from a timm data config.

    Evaluation is timm's own (`create_transform`: resize, crop by `crop_pct`, normalise).
    `light` adds, before normalising, a random shift of up to `pad` pixels (a padded random crop)
    and a horizontal flip where `flip`; `randaugment` is timm's training transform: random
    resized crop, flip, RandAugment (`RANDAUGMENT`) and random erasing (`RANDOM_ERASING`).
    """
    common = {k: preprocessing[k] for k in ("input_size", "interpolation", "mean", "std")}
    eval_tf = create_transform(is_training=False, crop_pct=preprocessing["crop_pct"],
                               crop_mode=preprocessing["crop_mode"], **common)
    if aug == "none":
        return eval_tf, eval_tf
    if aug == "randaugment":
        return create_transform(is_training=True, hflip=0.5 if flip else 0.0, auto_augment=RANDAUGMENT,
                                re_prob=RANDOM_ERASING, re_mode="pixel", **common), eval_tf
    *resize, to_tensor, normalize = eval_tf.transforms
    shift = [T.RandomCrop(preprocessing["input_size"][1:], padding=pad)] if pad else []
    return T.Compose([*resize, *shift, *([T.RandomHorizontalFlip()] if flip else []), to_tensor, normalize]), eval_tf


def _statistics(samples: Samples, preprocessing: dict[str, Any], mode: str,
                workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of up to `STATS_IMAGES` images as the model will see them
    (decoded by the loader's workers)."""
    channels = preprocessing["input_size"][0]
    _, plain = transforms({**preprocessing, "mean": (0.0,) * channels, "std": (1.0,) * channels}, "none", False, 0)
    first = samples.take(torch.arange(min(len(samples), STATS_IMAGES)))
    loader = DataLoader(TransformDataset(first, plain, plain, mode), batch_size=64, num_workers=workers)
    images = torch.cat([x for x, _ in loader])
    return images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))


def _resolve_preprocessing(preprocessing: dict[str, Any] | None, in_chans: int,
                           size: tuple[int, int]) -> dict[str, Any]:
    cfg = {"input_size": (in_chans, *size), **PLAIN, "mean": None, "std": None, **(preprocessing or {})}
    unknown = sorted(set(cfg) - {"input_size", *PLAIN, "mean", "std"})
    if unknown:
        raise ConfigError(f"preprocessing has unknown keys: {', '.join(unknown)}")
    one_of("interpolation", cfg["interpolation"], INTERPOLATIONS)
    one_of("crop_mode", cfg["crop_mode"], CROP_MODES)
    in_range("crop_pct", cfg["crop_pct"], 0.0, 1.0, low_open=True)
    for key in ("mean", "std"):
        if cfg[key] is not None and len(cfg[key]) != in_chans:
            raise ConfigError(f"preprocessing {key} has {len(cfg[key])} values for {in_chans} channels")
    return cfg


def open_source(source: str, root: str | os.PathLike | None = None) -> RawData:
    """The splits of a built-in source (`DATA_SOURCES`), as it ships them, not yet resized: what
    `load_data` takes, and where a caller learns the class names before building a model."""
    spec = DATA_SOURCES.get(source)
    return replace(spec.read(Path(root) if root is not None else None), name=source, flip=spec.flip)


def default_workers() -> int:
    """Loader workers of the per-sample path: one per core but one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def load_data(source: str | RawData = "digits", root: str | os.PathLike | None = None,
              img_size: int | tuple[int, int] = 8, in_chans: int = 1, batch_size: int = 64,
              val_fraction: float = 0.1, seed: int = 0, aug: str = "light", limit: int | None = None,
              shift: int | None = None, *, preprocessing: dict[str, Any] | None = None,
              workers: int | None = None, pin_memory: bool | None = None) -> DataBundle:
    """Load a built-in source (`DATA_SOURCES`, or what `open_source` returned) at `img_size` with
    `in_chans` channels.

    Validation: the source's own `val` split if it has one, else `val_fraction` of the training
    images (a permutation fixed by `seed`). `limit` caps the training pool and the validation and
    test sets (quick runs and tests). `preprocessing` is a timm data config (`interpolation`,
    `crop_pct`, `crop_mode`, `mean`, `std`; `vitcompact.models.preprocess.data_config(model)`); missing
    keys take the plain defaults (bilinear, no crop) and a missing mean/std the training split's
    own per-channel statistics. `aug`: `none`, `light` (random shifts of up to `shift` pixels,
    default an eighth of the side from 16 px up, and horizontal flips where the source allows
    them) or `randaugment` (timm's RandAugment and random erasing).

    Two paths behind the same loaders: the small in-memory sources with plain preprocessing and
    light augmentation are resized once and served a whole batch at a time (`ImageDataset`);
    image folders, RandAugment, timm crops, and resizes too large to hold in memory go through
    per-sample timm transforms in `workers` DataLoader processes (`TransformDataset`; default
    `default_workers()`), so memory stays flat as the data grows. `pin_memory` (default: when CUDA
    is available) pins the loaders' batches for fast copies to the GPU.
    """
    size = _check_load_args(img_size, in_chans, batch_size, val_fraction, seed, aug, limit, shift, workers)
    cfg = _resolve_preprocessing(preprocessing, in_chans, size)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    raw = open_source(source, root) if isinstance(source, str) else source
    splits = _split(raw, val_fraction, seed, limit)
    pad = shift if shift is not None else (min(size) // 8 if min(size) >= 16 else 0)
    in_memory = all(isinstance(s, TensorSamples) for s in splits)
    resized_bytes = sum(len(s) for s in splits) * in_chans * size[0] * size[1]
    batched = (in_memory and aug != "randaugment" and resized_bytes <= MAX_RESIZED_BYTES
               and (cfg["interpolation"], cfg["crop_pct"]) == (PLAIN["interpolation"], PLAIN["crop_pct"]))
    if batched:
        datasets, mean, std = _batched(splits, cfg, aug, raw.flip, pad)
        loader_workers = 0
    else:
        loader_workers = default_workers() if workers is None else workers
        datasets, mean, std = _per_sample(splits, cfg, aug, raw, pad, loader_workers)

    def loader(ds: Dataset, train_split: bool) -> DataLoader:
        # The trainer re-creates the training loader per epoch with its own seeded order.
        return DataLoader(ds, batch_size=batch_size, shuffle=train_split, drop_last=False,
                          collate_fn=collate if batched else None, num_workers=loader_workers,
                          pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(seed) if train_split else None)

    cfg.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    return DataBundle(loader(datasets[0], True), loader(datasets[1], False), loader(datasets[2], False),
                      len(raw.class_names), cfg["mean"], cfg["std"], list(raw.class_names), raw.name, cfg, aug)


def _check_load_args(img_size: int | tuple[int, int], in_chans: int, batch_size: int, val_fraction: float,
                     seed: int, aug: str, limit: int | None, shift: int | None,
                     workers: int | None) -> tuple[int, int]:
    """Refuse bad `load_data` arguments before any file is read; the image size as (H, W)."""
    one_of("aug", aug, AUGMENTATIONS)
    in_range("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    for side in size:
        integer("img_size", side, 1, MAX_IMG_SIZE)
    integer("in_chans", in_chans, 1, MAX_CHANNELS)
    integer("batch_size", batch_size, 1)
    validate.seed("seed", seed)
    if shift is not None:
        integer("shift", shift, 0, min(size) - 1, note="less than img_size")
    if limit is not None:
        integer("limit", limit, 2)
    if workers is not None:
        integer("workers", workers, 0, 64)
    return size


def _split(raw: RawData, val_fraction: float, seed: int, limit: int | None) -> tuple[Samples, Samples, Samples]:
    """Train, validation and test samples: the source's own validation split, else `val_fraction`
    of a permutation of the training images fixed by `seed`; `limit` caps all three."""
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    if raw.val is not None:
        train, val = raw.train.take(order), raw.val
    else:
        n_val = max(1, int(round(len(order) * val_fraction)))
        if n_val >= len(order):
            raise DataError(f"{raw.name}: {len(order)} training images are too few for a validation split")
        train, val = raw.train.take(order[n_val:]), raw.train.take(order[:n_val])
    test = raw.test
    if limit is not None:
        val, test = (s.take(torch.arange(min(limit, len(s)))) for s in (val, test))
    return train, val, test


def _per_sample(splits: tuple[Samples, ...], cfg: dict[str, Any], aug: str, raw: RawData, pad: int,
                workers: int) -> tuple[tuple[Dataset, ...], torch.Tensor, torch.Tensor]:
    """The per-sample path: timm transforms in DataLoader workers; statistics of the training split
    where the preprocessing does not give them."""
    in_chans = cfg["input_size"][0]
    if in_chans not in (1, 3):
        raise DataError(f"{raw.name}: images are read as grey or RGB; a model with {in_chans} input "
                        "channels needs the in-memory path (plain preprocessing, light augmentation)")
    mode = "L" if in_chans == 1 else "RGB"
    train, val, test = splits
    if cfg["mean"] is None or cfg["std"] is None:
        mean_t, std_t = _statistics(train, cfg, mode, workers)
        cfg["mean"], cfg["std"] = tuple(float(v) for v in mean_t), tuple(float(v) for v in std_t.clamp_min(1e-3))
    train_tf, eval_tf = transforms(cfg, aug, raw.flip, pad)
    datasets = (TransformDataset(train, train_tf, eval_tf, mode),
                *(TransformDataset(s, eval_tf, eval_tf, mode) for s in (val, test)))
    return datasets, torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])


def _batched(splits: tuple[Samples, ...], cfg: dict[str, Any], aug: str, flip: bool,
             pad: int) -> tuple[tuple[ImageDataset, ...], torch.Tensor, torch.Tensor]:
    """The in-memory path: every split resized once; statistics of the resized training split."""
    in_chans, height, width = cfg["input_size"]
    train_x, val_x, test_x = (_resize(_to_channels(s.images, in_chans), (height, width)) for s in splits)
    if cfg["mean"] is None or cfg["std"] is None:
        scaled = train_x.float().div(255.0)
        mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    else:
        mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    datasets = (ImageDataset(train_x, splits[0].labels, mean, std, augment=aug == "light", flip=flip, shift=pad),
                ImageDataset(val_x, splits[1].labels, mean, std),
                ImageDataset(test_x, splits[2].labels, mean, std))
    return datasets, mean, std


def load_data_for(model: nn.Module, source: str | RawData = "digits", root: str | os.PathLike | None = None,
                  reset_classifier: bool = False, **options) -> DataBundle:
    """`load_data` with `model`'s input (channels, size) and preprocessing (`data_config`): its
    own normalisation when it knows one, else the training data's, which is then recorded on the
    model (so saving it, exporting it and every later command use the same numbers). Data whose
    class count is not the model's is refused, unless `reset_classifier` gives the model a new
    classifier of the right size (timm's `reset_classifier`). `options` go to `load_data`."""
    cfg = data_config(model)
    known = get_record(model).preprocessing_known
    preprocessing = {k: cfg[k] for k in ("interpolation", "crop_pct", "crop_mode", *(("mean", "std") if known else ()))}
    bundle = load_data(source, root=root, img_size=cfg["input_size"][1:], in_chans=cfg["input_size"][0],
                       preprocessing=preprocessing, **options)
    if bundle.num_classes != model.num_classes:
        if not reset_classifier:
            raise ConfigError(f"{bundle.source or 'the data'} has {bundle.num_classes} classes but the model has "
                              f"{model.num_classes}; pick a model built for this data (or reset its classifier)")
        set_num_classes(model, bundle.num_classes)
    if not known:
        set_data_config(model, True, mean=bundle.mean, std=bundle.std)
    return bundle
