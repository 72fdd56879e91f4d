"""Issue 15's data path: lazy image folders, the model's own preprocessing, timm augmentation,
classifiers sized to the data."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.data import ImageDataset, TransformDataset, bundle as bundle_module, samples
from vitcompact.models.preprocess import set_data_config
from vitcompact.training import TrainConfig, train
from vitcompact.training.seeding import seed_everything

from conftest import one_line_error

runner = CliRunner()


def make_folder(root: Path, classes: int = 3, per_class: int = 6, size: tuple[int, int] = (20, 14),
                splits: tuple[str, ...] = ("train", "test"), seed: int = 0) -> Path:
    """Class-per-folder PNGs of smooth random images, each class its own colour."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
                base[..., c % 3] = 255
                Image.fromarray(base).resize(size, Image.BILINEAR).save(folder / f"{i}.png")
    return root


def test_folder_images_are_decoded_only_when_a_batch_asks(tmp_path, monkeypatch):
    root = make_folder(tmp_path, per_class=10)
    decoded = []
    real = samples.decode_image
    monkeypatch.setattr(samples, "decode_image", lambda p: decoded.append(p) or real(p))
    known = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    b = vc.load_data("imagefolder", root=root, img_size=8, in_chans=3, batch_size=4, workers=0, preprocessing=known)
    assert decoded == [] and isinstance(b.train.dataset, TransformDataset)
    x, y = next(iter(b.train))
    assert len(decoded) == 4 and x.shape == (4, 3, 8, 8)
    # Without a known normalisation, the statistics are read once from the training images.
    decoded.clear()
    b = vc.load_data("imagefolder", root=root, img_size=8, in_chans=3, workers=0)
    assert len(decoded) == len(b.train.dataset) == 27


def test_folder_larger_than_a_memory_cap_still_trains(tmp_path):
    # 100 images of 2048 x 2048: 1.26 GB decoded, far more than the headroom the cap leaves above
    # what the process itself needs (the cap fails a run that holds the decoded images).
    # Four different images per class and split, each in the folder as several files (links to it):
    # every file is read and decoded on its own all the same, and encoding 100 big JPEGs takes seconds.
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 2)):
        for c in ("a", "b"):
            folder = tmp_path / "big" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                if i < 4:
                    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(small).resize((2048, 2048), Image.BILINEAR).save(folder / f"{i}.jpg", quality=80)
                else:
                    os.link(folder / f"{i % 4}.jpg", folder / f"{i}.jpg")
    cap = 1600 << 20

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    cmd = [sys.executable, "-m", "vitcompact.cli", "train", "vit-cifar-tiny", "--data", "imagefolder", "--data-root",
           str(tmp_path / "big"), "--epochs", "1", "--batch-size", "8", "--workers", "1", "--out",
           str(tmp_path / "out"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["epochs"] == 1
    assert vc.load(tmp_path / "out").num_classes == 2


def test_preprocessing_of_a_timm_model_is_timms_own(tmp_path):
    root = make_folder(tmp_path, size=(50, 37))
    model = vc.create_model("vit_tiny_patch16_224", img_size=48, patch_size=16, depth=1, num_classes=3)
    timm_own = resolve_model_data_config(timm.create_model("vit_tiny_patch16_224"))
    set_data_config(model, True, **{k: v for k, v in timm_own.items() if k != "input_size"})
    timm_cfg = resolve_model_data_config(model)
    assert timm_cfg["input_size"] == (3, 48, 48) and timm_cfg["crop_pct"] == 0.9
    b = vc.load_data_for(model, "imagefolder", root, aug="none", workers=0)
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        assert tuple(b.preprocessing[key]) == tuple(timm_cfg[key]) if key in ("input_size", "mean", "std") \
            else b.preprocessing[key] == timm_cfg[key], key
    timms = create_transform(**timm_cfg)
    first = b.test.dataset.samples.paths[0]
    x, _ = b.test.dataset[0]
    assert torch.equal(x, timms(Image.open(first).convert("RGB")))


def test_a_new_model_records_the_datas_normalisation(tmp_path):
    model = vc.create_model("vit-digits")
    assert not vc.get_record(model).preprocessing_known
    b = vc.load_data_for(model, "digits", limit=200)
    assert isinstance(b.train.dataset, ImageDataset)  # the small source keeps the batched path
    assert vc.get_record(model).preprocessing_known and model.pretrained_cfg["mean"] == b.mean
    vc.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["mean"] == list(b.mean) and config["std"] == list(b.std)
    again = vc.load_data_for(vc.load(tmp_path / "m"), "digits", limit=300)
    assert again.mean == b.mean  # the model's own now, not the new data's


def test_folder_splits_are_disjoint_and_fixed_by_seed(tmp_path):
    root = make_folder(tmp_path, per_class=10)

    def paths(b, split):
        return {str(p) for p in getattr(b, split).dataset.samples.paths}

    a, again, other = (vc.load_data("imagefolder", root=root, img_size=8, in_chans=3, seed=s, val_fraction=0.2,
                                    workers=0) for s in (1, 1, 2))
    assert paths(a, "train").isdisjoint(paths(a, "val")) and paths(a, "val").isdisjoint(paths(a, "test"))
    assert len(paths(a, "train")) == 24 and len(paths(a, "val")) == 6
    assert paths(a, "val") == paths(again, "val") and paths(a, "val") != paths(other, "val")
    # A val/ folder beside test/ is the validation split.
    make_folder(root / "extra", per_class=2, splits=("val",))
    (root / "extra" / "val").rename(root / "val")
    b = vc.load_data("imagefolder", root=root, img_size=8, in_chans=3, workers=0)
    assert paths(b, "val") == {str(p) for p in (root / "val").rglob("*.png")} and len(paths(b, "train")) == 30


def test_large_resizes_of_small_sources_are_done_per_sample(monkeypatch):
    monkeypatch.setattr(bundle_module, "MAX_RESIZED_BYTES", 1000)
    b = vc.load_data("digits", img_size=16, limit=100, workers=0)
    assert isinstance(b.train.dataset, TransformDataset)
    x, _ = next(iter(b.test))
    assert x.shape == (64, 1, 16, 16)


def test_randaugment_batches_repeat_under_a_seed():
    def first_batch():
        b = vc.load_data("digits", img_size=16, limit=100, aug="randaugment", workers=0)
        seed_everything(3)  # RandAugment draws from Python's and numpy's RNGs too
        return next(iter(b.train))[0]
    assert isinstance(vc.load_data("digits", limit=100, aug="randaugment").train.dataset, TransformDataset)
    assert torch.equal(first_batch(), first_batch())


def test_unknown_augmentation_is_refused():
    with pytest.raises(vc.ConfigError, match="unknown aug 'heavy'"):
        vc.load_data("digits", aug="heavy")


def test_mixup_cutmix_training_repeats_and_uses_soft_targets(bundle):
    def run():
        torch.manual_seed(0)
        model = vc.create_model("vit-digits", depth=1)
        result = train(model, bundle, TrainConfig(epochs=1, mixup=0.8, cutmix=1.0, progress=False))
        return model, result
    (a, ra), (b, rb) = run(), run()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.epochs[0]["train_loss"] == rb.epochs[0]["train_loss"]
    torch.manual_seed(0)
    plain = vc.create_model("vit-digits", depth=1)
    rp = train(plain, bundle, TrainConfig(epochs=1, progress=False))
    assert rp.epochs[0]["train_loss"] != ra.epochs[0]["train_loss"]
    with pytest.raises(vc.ConfigError, match="mixup"):
        TrainConfig(mixup=-1.0)


def test_a_new_model_gets_a_classifier_for_the_datas_classes(tmp_path):
    root = make_folder(tmp_path / "four", classes=4, per_class=3, size=(8, 8))
    model, b = vc.model_and_data("vit-digits", "imagefolder", root, workers=0)
    assert model.num_classes == b.num_classes == 4
    ten = vc.create_model("vit-digits")
    vc.save(ten, tmp_path / "ten")
    with pytest.raises(vc.ConfigError, match="imagefolder has 4 classes but the model has 10"):
        vc.model_and_data(tmp_path / "ten", "imagefolder", root, workers=0)
    reset, _ = vc.model_and_data(tmp_path / "ten", "imagefolder", root, reset_classifier=True, workers=0)
    assert reset.num_classes == 4 and reset.head.weight.shape == (4, 64)
    kept = vc.load(tmp_path / "ten").state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in reset.state_dict().items() if not k.startswith("head."))
    vc.save(reset, tmp_path / "four_out")
    assert vc.load(tmp_path / "four_out").num_classes == 4


def test_cli_trains_a_preset_on_a_four_class_folder(tmp_path):
    root = make_folder(tmp_path / "four", classes=4, per_class=4, size=(8, 8))
    result = runner.invoke(app, ["train", "vit-digits", "--data", "imagefolder", "--data-root", str(root),
                                 "--epochs", "1", "--workers", "0", "--aug", "randaugment", "--mixup", "0.5",
                                 "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert vc.load(tmp_path / "out").num_classes == 4
    one_line_error(runner.invoke(app, ["train", "vit-digits", "--aug", "heavy", "--out", str(tmp_path / "x")]),
                   "unknown aug 'heavy'")
