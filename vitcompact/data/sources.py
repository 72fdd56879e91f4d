"""Built-in data sources, all offline: one registry from name to a reader of raw uint8 images.

A reader returns the source's own train and test splits as uint8 tensors `[N, C, H, W]` with
int64 labels; resizing, channel conversion, normalisation and the validation split happen in
`vitcompact.data.bundle`, the same for every source.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError
from ..registry import Registry


@dataclass
class RawData:
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    class_names: list[str]


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


def _digits(root: Path | None) -> RawData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' source needs scikit-learn: pip install 'vitcompact[digits]'") from None
    digits = load_digits()
    # Values are 0..16; scale to the 0..255 range every other source uses.
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # scikit-learn ships no test split: hold out a fixed 20% (seed fixed, independent of the run's seed).
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return RawData(images[train], labels[train], images[test], labels[test], [str(i) for i in range(10)])


def _open_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is corrupt or unreadable: {e}") from None


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read one IDX file (the MNIST format): magic 0x0000 08 dims, big-endian sizes, uint8 data."""
    data = _open_maybe_gzip(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != expect_dims:
        raise DataError(f"{path} is not an IDX file of {expect_dims}-d uint8 data (bad magic number)")
    header = 4 + 4 * expect_dims
    if len(data) < header:
        raise DataError(f"{path} is truncated (header incomplete)")
    shape = struct.unpack(f">{expect_dims}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(f"{path} is truncated or has trailing bytes: expected {count} values for "
                        f"shape {shape}, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing file {root / (stem + '.gz')} (or uncompressed {stem})")


def _idx_split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_path, lbl_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


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
        train_x, train_y = _idx_split(root, "train")
        test_x, test_y = _idx_split(root, "t10k")
        return RawData(train_x, train_y, test_x, test_y, class_names)
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
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"{path} is corrupt or not a CIFAR python batch: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry of a CIFAR batch")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: expected data of shape [N, 3072] and N labels, got {data.shape} "
                        f"and {labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _cifar_source(name: str, folder: str, train_files: list[str], test_file: str, meta_file: str,
                  label_key: str, names_key: str):
    def read(root: Path | None) -> RawData:
        root = _need_dir(root, name, f"holding {folder}/ or its batch files")
        if (root / folder).is_dir():
            root = root / folder
        parts = [_cifar_batch(root / f, label_key) for f in train_files]
        test_x, test_y = _cifar_batch(root / test_file, label_key)
        class_names = [str(i) for i in range(int(max(int(p[1].max()) for p in parts)) + 1)]
        if (root / meta_file).is_file():
            meta = _load_pickle(root / meta_file)
            if names_key in meta:
                class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
        return RawData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                       test_x, test_y, class_names)
    return read


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _read_folder(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _decode_images(paths: list[Path]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    arrays, size = [], None
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                # Folders often mix sizes; bring all to the first image's size, the bundle resizes later.
                size = size or im.size
                arrays.append(np.asarray(im.resize(size) if im.size != size else im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{p} is corrupt or not an image: {e}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _imagefolder(root: Path | None) -> RawData:
    root = _need_dir(root, "imagefolder", "with train/<class>/*.png and test/<class>/*.png (or val/)")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root} must hold train/ and test/ (or val/) folders of class-per-folder images")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{train_dir} holds no class folders")
    train_paths, train_labels = _read_folder(train_dir, classes)
    test_paths, test_labels = _read_folder(test_dir, classes)
    if not train_paths or not test_paths:
        raise DataError(f"{train_dir if not train_paths else test_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return RawData(_decode_images(train_paths), torch.tensor(train_labels, dtype=torch.int64),
                   _decode_images(test_paths), torch.tensor(test_labels, dtype=torch.int64), classes)


DATA_SOURCES.register("digits")(DataSource(_digits, False, "scikit-learn's bundled 8x8 digits (1797 images)"))
DATA_SOURCES.register("fashion-mnist")(DataSource(
    _idx_source("fashion-mnist", FASHION_CLASSES, FASHION_DEFAULT_ROOT), True,
    f"IDX .gz files in a folder (default {FASHION_DEFAULT_ROOT})"))
DATA_SOURCES.register("mnist")(DataSource(
    _idx_source("mnist", [str(i) for i in range(10)], None), False, "IDX .gz files in a folder"))
DATA_SOURCES.register("cifar10")(DataSource(
    _cifar_source("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  "test_batch", "batches.meta", "labels", "label_names"), True,
    "cifar-10-batches-py python-pickle folder"))
DATA_SOURCES.register("cifar100")(DataSource(
    _cifar_source("cifar100", "cifar-100-python", ["train"], "test", "meta", "fine_labels",
                  "fine_label_names"), True, "cifar-100-python python-pickle folder"))
DATA_SOURCES.register("imagefolder")(DataSource(_imagefolder, True, "train/ and test/ class-per-folder images"))
