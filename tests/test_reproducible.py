"""Same seed, same machine: `train` and `prune` give bit-identical weights, masks and metrics,
model initialisation included (each run is a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "vitcompact.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_identical(a: Path, b: Path, files: list[str]) -> None:
    for name in files:
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys()
        different = [k for k in ta if not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                                           and bool((ta[k] == tb[k]).all()))]
        assert different == [], f"{name}: {different[:5]}"
    assert _metrics(a / "metrics.jsonl") == _metrics(b / "metrics.jsonl")


@pytest.mark.slow
def test_train_twice_gives_identical_weights_and_metrics(tmp_path):
    for run in ("a", "b"):
        _cli("train", "vit-digits", "--data", "digits", "--epochs", "2", "--seed", "3", "--json",
             "--out", str(tmp_path / run))
    _assert_identical(tmp_path / "a", tmp_path / "b", ["model.safetensors"])
    c = tmp_path / "c"
    _cli("train", "vit-digits", "--data", "digits", "--epochs", "2", "--seed", "4", "--json", "--out", str(c))
    assert not (_tensors(c / "model.safetensors")["head.weight"] == _tensors(tmp_path / "a" / "model.safetensors")[
        "head.weight"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rsst", "oneshot"])
def test_prune_twice_gives_identical_weights_masks_and_metrics(tmp_path, method):
    # From a preset name: the random initialisation itself must repeat.
    for run in ("a", "b"):
        split = ["--states", "2", "--epochs-per-state", "1", "--finetune-epochs", "1"] if method == "rsst" else [
            "--finetune-epochs", "3"]  # the same epochs, one-shot spends them fine-tuning
        _cli("prune", "vit-digits", "--data", "digits", "--method", method, "--head-ratio", "0.5",
             "--mlp-ratio", "0.5", *split,
             "--seed", "1", "--json", "--out", str(tmp_path / run))
    _assert_identical(tmp_path / "a", tmp_path / "b", ["model.safetensors", "masks.safetensors"])
