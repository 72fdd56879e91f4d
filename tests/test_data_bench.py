"""The data benchmarks run end to end on tiny settings; they assert nothing about speed or memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from studies import data_speed
from studies.data_memory import tree_pss_mb
from studies.image_folder import write_image_folder


def test_data_speed_prints_both_rates(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = data_speed.main(["--model", "vit-digits", "--data", "digits", "--batch-size", "32",
                              "--batches", "2", "--rounds", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "loader" in printed and "training" in printed and "bottleneck" in printed
    assert result["loader_images_per_s"] > 0 and result["training_images_per_s"] > 0
    assert json.loads(out.read_text())["ratio"] == pytest.approx(result["ratio"])


def test_image_folder_writes_decodable_224px_jpegs(tmp_path):
    root = write_image_folder(tmp_path, images=6, classes=3, test_fraction=0.5)
    for split, per_class in (("train", 2), ("test", 1)):
        folders = sorted((root / split).iterdir())
        assert [f.name for f in folders] == ["class0", "class1", "class2"]
        for folder in folders:
            files = sorted(folder.glob("*.jpg"))
            assert len(files) == per_class
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.size == (224, 224) and im.mode == "RGB"


def test_image_folder_repeats_with_its_seed(tmp_path):
    a, b = (write_image_folder(tmp_path / name, images=2, classes=2) for name in "ab")
    assert (a / "train/class1/00000.jpg").read_bytes() == (b / "train/class1/00000.jpg").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_tree_pss_counts_this_process():
    assert tree_pss_mb(os.getpid()) > 10
