"""Training speed options: batched data path, autocast precision, torch.compile, and what `auto` picks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import vitcompact as vc
from vitcompact.data.bundle import ImageDataset, collate
from vitcompact.errors import ConfigError
from vitcompact.training.trainer import BF16_MIN_WIDTH, autocast_dtype, native_bf16


def _images(n: int = 12, side: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n), torch.tensor([0.5]), torch.tensor([0.25]))


def test_batched_items_equal_per_sample_items_without_augmentation():
    ds = _images()
    x, y = ds.__getitems__([3, 0, 7])
    for row, i in enumerate([3, 0, 7]):
        xi, yi = ds[i]
        assert torch.equal(x[row], xi) and int(y[row]) == int(yi) == i
    assert torch.equal(x[1], (ds.images[0].float() / 255 - 0.5) / 0.25)


def test_random_shift_is_a_crop_of_the_zero_padded_image():
    ds = _images(side=16)
    ds.augment, ds.pad = True, 2
    torch.manual_seed(1)
    x, _ = ds.__getitems__(list(range(12)))
    padded = F.pad(ds.images.float() / 255, (2,) * 4)
    offsets = set()
    for i in range(12):
        raw = x[i] * 0.25 + 0.5
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.allclose(raw, padded[i, :, dy:dy + 16, dx:dx + 16], atol=1e-6)]
        assert len(hits) >= 1
        offsets.add(hits[0])
    assert len(offsets) > 1  # each image draws its own offset


def test_loader_with_collate_passes_batches_through():
    ds = _images()
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate))
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(12))


def test_auto_precision_rule():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu, 512) is None
    assert autocast_dtype("bf16", cpu, 8) is torch.bfloat16
    assert autocast_dtype("auto", cpu, BF16_MIN_WIDTH - 1) is None
    assert autocast_dtype("auto", cpu, BF16_MIN_WIDTH) is (torch.bfloat16 if native_bf16(cpu) else None)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu, 192)
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        vc.TrainConfig(precision="int4")


def _first_loss(config: vc.TrainConfig) -> tuple[float, str]:
    """Loss of one fixed batch under `config` (one step, so it is measured before any update)."""
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2, embed_dim=128, num_heads=2)
    bundle = vc.load_data("digits", batch_size=64, limit=71)  # 64 training images: one batch
    result = vc.train(model, bundle, dataclasses.replace(config, epochs=1, progress=False))
    return result.epochs[0]["train_loss"], result.precision


@pytest.mark.parametrize("option", [dict(precision="bf16"), dict(compile=True)], ids=["bf16", "compile"])
def test_speed_options_give_the_fp32_eager_loss(option):
    reference, precision = _first_loss(vc.TrainConfig(precision="fp32"))
    assert precision == "fp32"
    loss, precision = _first_loss(vc.TrainConfig(precision="fp32", **option) if "compile" in option
                                  else vc.TrainConfig(**option))
    assert precision == ("bf16" if option.get("precision") == "bf16" else "fp32")
    tolerance = 2e-2 if option.get("precision") == "bf16" else 1e-4
    assert loss == pytest.approx(reference, rel=tolerance)
    assert loss != reference or "compile" in option  # bf16 really ran in another precision
