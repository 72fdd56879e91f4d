"""Built-in data sources, all offline: one registry from name to a reader of raw uint8 images.

A reader returns the source's own splits as `Samples` (`vitcompact.data.samples`): uint8 tensors
in memory for the small sources, files decoded on demand for image folders. Resizing, channel
conversion, normalisation, augmentation and the validation split happen in
`vitcompact.data.bundle`, the same for every source.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from ..errors import DataError
from ..io import regular_file
from ..registry import Registry
from .samples import FileSamples, Samples, TensorSamples, check_image


@dataclass
class RawData:
    """A source's splits as it ships them: `val` only where the source has its own validation split
    (an image folder's `val/` beside `test/`); otherwise validation comes off `train`."""

    train: Samples
    test: Samples
    class_names: list[str]
    val: Samples | None = None
    name: str = ""
    flip: bool = True  # whether a horizontal flip is a valid augmentation (the source's `flip`)


@dataclass(frozen=True)
class DataSource:
    """How to read one dataset. `flip` says whether a horizontal flip is a valid augmentation
    (not for digits, where a mirrored 2 is no longer a 2)."""

    read: Callable[[Path | None], RawData]
    flip: bool
    description: str


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def _need_dir(root: Path | None, name: str, hint: str) -> Path:
    if root is None:
        raise DataError(f"data source {name!r} needs a folder: pass root= (--data-root) {hint}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist ({name}: {hint})")
    return root


# digits.npz ships with the package so that the demo runs from a plain install: scikit-learn's copy
# of the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak; CC BY 4.0),
# 1797 8x8 images, written once from `sklearn.datasets.load_digits()` with values 0..16 scaled to
# the 0..255 range every other source uses: `np.round(images * (255 / 16)).astype(np.uint8)`.
DIGITS_FILE = "digits.npz"


def _digits(root: Path | None) -> RawData:
    path = resources.files(__package__).joinpath(DIGITS_FILE)
    try:
        with path.open("rb") as f, np.load(f) as digits:
            images = torch.from_numpy(digits["images"]).unsqueeze(1)
            labels = torch.from_numpy(digits["labels"].astype(np.int64))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is missing or corrupt ({e}); reinstall vitcompact") from None
    # The source has no test split: hold out a fixed 20% (seed fixed, independent of the run's seed).
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return RawData(TensorSamples(images[train], labels[train]), TensorSamples(images[test], labels[test]),
                   [str(i) for i in range(10)])


# An IDX header may claim any size; refuse more values than the largest real dataset file holds
# many times over (Fashion-MNIST's training images are 47M), before reading or decompressing them.
MAX_IDX_VALUES = 2**31


def _read_idx_stream(path: Path, stream: BinaryIO, expect_dims: int) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08 or magic[3] != expect_dims:
        raise DataError(f"{path} is not an IDX file of {expect_dims}-d uint8 data (bad magic number)")
    dims = stream.read(4 * expect_dims)
    if len(dims) < 4 * expect_dims:
        raise DataError(f"{path} is truncated (header incomplete)")
    shape = struct.unpack(f">{expect_dims}I", dims)
    if min(shape) < 1:
        raise DataError(f"{path}: the header gives shape {shape}, with an empty dimension")
    count = math.prod(shape)  # exact: no overflow, unlike a product of fixed-width integers
    if count > MAX_IDX_VALUES:
        raise DataError(f"{path}: the header gives shape {shape}, {count:,} values, more than the "
                        f"{MAX_IDX_VALUES:,} an IDX file may hold here; the header is corrupt")
    data = bytearray()
    while len(data) < count:  # in chunks: a header that lies costs no more memory than the data
        chunk = stream.read(min(count - len(data), 1 << 24))
        if not chunk:
            break
        data += chunk
    if len(data) != count or stream.read(1):
        found = str(len(data)) if len(data) < count else "more"
        raise DataError(f"{path} is truncated or has trailing bytes: expected {count} values for "
                        f"shape {shape}, found {found}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read one IDX file (the MNIST format): magic 0x0000 08 dims, big-endian sizes, uint8 data;
    gzip-compressed or not. The header's sizes are checked before the data is read (or inflated),
    and the data must fill them exactly."""
    path = regular_file(path, DataError)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            with (gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw)) as stream:
                return _read_idx_stream(path, stream, expect_dims)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or unreadable: {e}") from None


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DataError(f"missing file {root / (stem + '.gz')} (or uncompressed {stem})")


def check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Refuse a label outside 0..num_classes-1, naming the file and the first bad index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: label {int(labels[i])} at index {i} is outside 0..{num_classes - 1} "
                        f"({num_classes} classes)")
    return labels


def _idx_split(root: Path, prefix: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    img_path, lbl_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    labels = check_labels(lbl_path, labels.astype(np.int64), num_classes)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _idx_source(name: str, class_names: list[str], default_root: Path | None):
    def read(root: Path | None) -> RawData:
        hint = "with train-/t10k-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz"
        if root is None and default_root is not None and default_root.is_dir():
            root = default_root
        elif root is None and default_root is not None:
            raise DataError(f"{name}: no folder given and {default_root} does not exist; install "
                            f"Debian's dataset-fashion-mnist or pass a folder {hint}")
        root = _need_dir(root, name, hint)
        train_x, train_y = _idx_split(root, "train", len(class_names))
        test_x, test_y = _idx_split(root, "t10k", len(class_names))
        return RawData(TensorSamples(train_x, train_y), TensorSamples(test_x, test_y), class_names)
    return read


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only numpy array reconstruction, nothing executable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"missing file {path}")
    regular_file(path, DataError)
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{path} is corrupt or not a CIFAR python batch: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _integers(path: Path, name: str, value, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: '{name}' is not an array of integers: {e}") from None
    if array.ndim != ndim or (array.size and array.dtype.kind not in "iu"):
        raise DataError(f"{path}: '{name}' must be a {ndim}-d array of integers, got {array.dtype} "
                        f"of shape {array.shape}")
    return array


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry of a CIFAR batch")
    data = _integers(path, "data", d["data"], 2)
    labels = _integers(path, label_key, d[label_key], 1).astype(np.int64)
    if data.shape[1] != 3072 or len(data) != len(labels) or not len(data):
        raise DataError(f"{path}: expected data of shape [N, 3072] and N labels (N >= 1), got "
                        f"{data.shape} and {labels.shape}")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: pixel values must lie in 0..255")
    check_labels(path, labels, num_classes)
    return torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _cifar_source(name: str, folder: str, train_files: list[str], test_file: str, meta_file: str,
                  label_key: str, names_key: str, num_classes: int):
    def read(root: Path | None) -> RawData:
        root = _need_dir(root, name, f"holding {folder}/ or its batch files")
        if (root / folder).is_dir():
            root = root / folder
        class_names = [str(i) for i in range(num_classes)]
        if (root / meta_file).exists():
            meta = _load_pickle(root / meta_file)
            if names_key in meta:
                names = meta[names_key]
                if not isinstance(names, (list, tuple)) or len(names) != num_classes:
                    raise DataError(f"{root / meta_file}: '{names_key}' must list {num_classes} class "
                                    f"names for {name}")
                class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        parts = [_cifar_batch(root / f, label_key, num_classes) for f in train_files]
        test_x, test_y = _cifar_batch(root / test_file, label_key, num_classes)
        train = TensorSamples(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return RawData(train, TensorSamples(test_x, test_y), class_names)
    return read


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _class_folders(split: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are not classes.
    return sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _no_images(cls: str, folder: Path) -> DataError:
    return DataError(f"class {cls} has no images: {folder} holds none ({', '.join(IMAGE_SUFFIXES)}); "
                     "remove the folder or add images")


def _read_folder(root: Path, classes: list[str]) -> FileSamples:
    """The files of one split, listed and their headers checked (`check_image`); decoding
    happens per sample, in the loader."""
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = _images_in(folder)
        if not files:
            raise _no_images(cls, folder)
        for path in files:
            check_image(path)
        paths += files
        labels += [label] * len(files)
    return FileSamples(paths, torch.tensor(labels, dtype=torch.int64))


def _same_classes(split: Path, train_dir: Path, classes: list[str]) -> None:
    found = _class_folders(split)
    if found != classes:
        missing = sorted(set(classes) - set(found))
        unknown = sorted(set(found) - set(classes))
        empty = next((c for c in unknown if not _images_in(split / c)), None)
        if empty is not None:  # a stray empty folder is named as such, not as a class train/ lacks
            raise _no_images(empty, split / empty)
        raise DataError(f"{split} and {train_dir} must hold the same classes: "
                        + "; ".join(part for part in (
                            f"not in {split.name}/: {', '.join(missing)}" if missing else "",
                            f"not in train/: {', '.join(unknown)}" if unknown else "") if part))


def _imagefolder(root: Path | None) -> RawData:
    """train/<class>/ and test/<class>/ folders of images, optionally val/<class>/ beside them (the
    validation split; without it, validation comes off train/). A folder with train/ and val/ but
    no test/ (ImageNet's layout) reports on val/. The same classes everywhere, at least two, none
    empty (hidden folders are not classes); each image at most `MAX_IMAGE_PIXELS` pixels. Images
    are decoded when the loader asks for them, never all at once."""
    root = _need_dir(root, "imagefolder", "with train/<class>/*.png and test/<class>/*.png (or val/)")
    train_dir = root / "train"
    splits = {d: root / d for d in ("test", "val") if (root / d).is_dir()}
    if not train_dir.is_dir() or not splits:
        raise DataError(f"{root} must hold train/ and test/ (or val/) folders of class-per-folder images")
    classes = _class_folders(train_dir)
    if len(classes) < 2:
        raise DataError(f"{train_dir} holds {len(classes)} class folder(s); a classifier needs at least 2")
    empty = next((c for c in classes if not _images_in(train_dir / c)), None)
    if empty is not None:  # before the splits are compared: an empty class folder is named as such
        raise _no_images(empty, train_dir / empty)
    for split in splits.values():
        _same_classes(split, train_dir, classes)
    test_dir = splits.get("test", splits.get("val"))
    val_dir = splits["val"] if "test" in splits and "val" in splits else None
    return RawData(_read_folder(train_dir, classes), _read_folder(test_dir, classes), classes,
                   _read_folder(val_dir, classes) if val_dir is not None else None)


def _images(root: Path | None) -> RawData:
    """A flat folder of images with no labels (calibration data for a refit): every image in one
    class, the same files as train and test (a refit reads training images only)."""
    root = _need_dir(root, "images", "holding image files (no class folders)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        check_image(path)
    samples = FileSamples(files, torch.zeros(len(files), dtype=torch.int64))
    return RawData(samples, samples, ["unlabelled"])


DATA_SOURCES.register("digits")(DataSource(_digits, False, "8x8 digits shipped with vitcompact (1797 images)"))
DATA_SOURCES.register("fashion-mnist")(DataSource(
    _idx_source("fashion-mnist", FASHION_CLASSES, FASHION_DEFAULT_ROOT), True,
    f"IDX .gz files in a folder (default {FASHION_DEFAULT_ROOT})"))
DATA_SOURCES.register("mnist")(DataSource(
    _idx_source("mnist", [str(i) for i in range(10)], None), False, "IDX .gz files in a folder"))
DATA_SOURCES.register("cifar10")(DataSource(
    _cifar_source("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  "test_batch", "batches.meta", "labels", "label_names", 10), True,
    "cifar-10-batches-py python-pickle folder"))
DATA_SOURCES.register("cifar100")(DataSource(
    _cifar_source("cifar100", "cifar-100-python", ["train"], "test", "meta", "fine_labels",
                  "fine_label_names", 100), True, "cifar-100-python python-pickle folder"))
DATA_SOURCES.register("imagefolder")(DataSource(
    _imagefolder, True, "train/, test/ and optional val/ class-per-folder images, read lazily (each at "
    "most 4096x4096 pixels)"))
DATA_SOURCES.register("images")(DataSource(
    _images, True, "a flat folder of images without labels (calibration images for --method refit)"))
