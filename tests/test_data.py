"""Data sources load a small sample and reject corrupt files with a message naming the file."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import torch

from vitcompact.data import DATA_SOURCES, load_data
from vitcompact.errors import ConfigError, DataError, one_line


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(12)[::-1] % 10)
    return tmp_path


def test_registry_lists_every_source():
    assert DATA_SOURCES.names() == ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "images", "mnist"]


def test_digits_split_shapes_and_normalisation():
    bundle = load_data("digits", img_size=8, in_chans=1, batch_size=16, val_fraction=0.1, seed=0, limit=200)
    assert (len(bundle.train.dataset), len(bundle.val.dataset), len(bundle.test.dataset)) == (180, 20, 200)
    assert bundle.num_classes == 10 and bundle.class_names[3] == "3"
    x, y = next(iter(bundle.val))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Normalised with the training split's own statistics: mean 0 and std 1 over it.
    train_x = torch.cat([b[0] for b in bundle.calibration()])
    assert abs(float(train_x.mean())) < 1e-5
    assert abs(float(train_x.std()) - 1.0) < 1e-2


def test_shipped_digits_equal_scikit_learns():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    digits = load_digits()
    # The reader that used scikit-learn: 0..16 scaled to 0..255, a fixed 20% held out as test.
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    test, train = order[:len(labels) // 5], order[len(labels) // 5:]
    raw = DATA_SOURCES.get("digits").read(None)
    for got, want in ((raw.train.images, images[train]), (raw.train.labels, labels[train]),
                      (raw.test.images, images[test]), (raw.test.labels, labels[test])):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_digits_read_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any `import sklearn` now fails
    raw = DATA_SOURCES.get("digits").read(None)
    assert raw.train.images.shape == (1438, 1, 8, 8) and raw.test.images.shape == (359, 1, 8, 8)
    assert raw.train.images.dtype == torch.uint8 and int(raw.train.images.max()) == 255
    assert raw.class_names == [str(i) for i in range(10)]


def test_validation_split_is_fixed_by_seed_and_disjoint():
    a = load_data("digits", limit=300, seed=1)
    b = load_data("digits", limit=300, seed=1)
    c = load_data("digits", limit=300, seed=2)
    assert torch.equal(a.val.dataset.images, b.val.dataset.images)
    assert not torch.equal(a.val.dataset.images, c.val.dataset.images)
    assert torch.equal(a.test.dataset.images, c.test.dataset.images)  # the test set never moves
    train_rows = {t.numpy().tobytes() for t in a.train.dataset.images}
    assert not any(t.numpy().tobytes() in train_rows for t in a.val.dataset.images[:5])


def test_idx_source_resizes_and_keeps_test_labels(idx_folder):
    bundle = load_data("mnist", root=idx_folder, img_size=8, in_chans=3, batch_size=4, val_fraction=0.25)
    assert (len(bundle.train.dataset), len(bundle.val.dataset), len(bundle.test.dataset)) == (30, 10, 12)
    assert bundle.test.dataset.images.shape == (12, 3, 8, 8)
    assert bundle.test.dataset.labels.tolist() == (np.arange(12)[::-1] % 10).tolist()
    assert len(bundle.mean) == 3


def test_uncompressed_idx_files_load(idx_folder):
    data = gzip.decompress((idx_folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (idx_folder / "t10k-labels-idx1-ubyte").write_bytes(data)
    assert len(load_data("fashion-mnist", root=idx_folder, img_size=28).test.dataset) == 12


def test_truncated_idx_file_is_named(idx_folder):
    path = idx_folder / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.arange(40) % 10)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-3]))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is truncated or has trailing bytes: "
                                        r"expected 40 values for shape \(40,\), found 37"):
        load_data("mnist", root=idx_folder)


def test_corrupt_gzip_and_missing_file_are_named(idx_folder):
    (idx_folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is corrupt or unreadable"):
        load_data("mnist", root=idx_folder)
    (idx_folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing file .*t10k-images-idx3-ubyte.gz \(or uncompressed"):
        load_data("mnist", root=idx_folder)


def test_missing_folder_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match=f"data folder {tmp_path / 'nope'} does not exist"):
        load_data("mnist", root=tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown data source 'svhn'; choose one of: cifar10, cifar100"):
        load_data("svhn")


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def test_cifar10_pickles_load_with_class_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(6, 9)))
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    bundle = load_data("cifar10", root=tmp_path, img_size=16, in_chans=1, batch_size=4, val_fraction=0.2)
    assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (16, 4)
    assert bundle.test.dataset.images.shape == (6, 1, 16, 16)
    assert bundle.class_names[2] == "class2"


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(2, i)))
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match=r"data_batch_2 is corrupt or not a CIFAR python batch: "
                                        r"UnpicklingError: refusing to load builtins.print"):
        load_data("cifar10", root=tmp_path)


def test_imagefolder_loads_and_rejects_broken_image(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 12), (i * 40, 0, 200)).save(tmp_path / split / cls / f"{i}.png")
    bundle = load_data("imagefolder", root=tmp_path, img_size=8, in_chans=3, val_fraction=0.5)
    assert bundle.class_names == ["cat", "dog"]
    assert bundle.test.dataset.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "test" / "dog" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"test/dog/1.png is corrupt or not an image"):  # its header, at once
        load_data("imagefolder", root=tmp_path, img_size=8, in_chans=3)
    # Pixels are decoded lazily, in the loader's workers: the error names the file, and one line of it does.
    noisy = Image.effect_noise((64, 64), 40).convert("RGB")
    noisy.save(tmp_path / "test" / "dog" / "1.png")
    (tmp_path / "test" / "dog" / "1.png").write_bytes((tmp_path / "test" / "dog" / "1.png").read_bytes()[:-200])
    bundle = load_data("imagefolder", root=tmp_path, img_size=8, in_chans=3, workers=1)
    with pytest.raises(DataError, match=r"test/dog/1.png is corrupt or not an image") as caught:
        list(bundle.test)
    assert "Caught DataError in DataLoader worker" in str(caught.value)
    assert re.fullmatch(r"\S+/test/dog/1\.png is corrupt or not an image: .*", one_line(caught.value))


def test_calibration_images_are_unaugmented_also_through_a_subset(idx_folder):
    import dataclasses

    from torch.utils.data import DataLoader, Subset

    bundle = load_data("fashion-mnist", root=idx_folder, img_size=28, in_chans=1, batch_size=8, val_fraction=0.1,
                       seed=0, shift=2)
    train = bundle.train.dataset
    assert train.augment and train.flip  # the training split is augmented: a random shift and flip
    indices = [5, 0, 17, 3, 9, 30, 2, 11]
    augmented = [train.__getitems__(indices)[0] for _ in range(2)]
    assert not torch.equal(*augmented)
    plain = train.without_augmentation().__getitems__(indices)[0]
    subset = dataclasses.replace(bundle, train=DataLoader(Subset(train, indices), batch_size=4, shuffle=True,
                                                          collate_fn=bundle.train.collate_fn))
    for _ in range(2):
        assert torch.equal(torch.cat([x for x, _ in subset.calibration()]), plain)
