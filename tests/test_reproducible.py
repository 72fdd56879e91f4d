"""Same seed, same machine: `train` and `prune` give bit-identical weights, masks and metrics,
model initialisation included.

The two runs of each comparison are made in two fresh processes, "a" and "b". Each process runs the
CLI once per case (train, prune rsst, prune one-shot) in the same order; before each case it puts
the global random states back to what a fresh process starts from (Python's and numpy's drawn from
the OS, torch's at its start-up seed), so each run repeats from nothing an earlier case left behind.
Two processes instead of one per run: each start-up (torch, timm) costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TRAIN = ["train", "vit-digits", "--data", "digits", "--epochs", "2", "--json"]
PRUNE = ["prune", "vit-digits", "--data", "digits", "--head-ratio", "0.5", "--mlp-ratio", "0.5", "--seed", "1",
         "--json"]
# The same epochs for both methods: one-shot spends them fine-tuning. From a preset name, so the random
# initialisation itself must repeat.
CASES = {
    "train": [*TRAIN, "--seed", "3"],
    "rsst": [*PRUNE, "--method", "rsst", "--states", "2", "--epochs-per-state", "1", "--finetune-epochs", "1"],
    "oneshot": [*PRUNE, "--method", "oneshot", "--finetune-epochs", "3"],
}
OTHER_SEED = [*TRAIN, "--seed", "4"]

# Runs the CLI (the `vitcompact` app) on each argument list of argv[1] (JSON) in turn, each from the
# global random states of a fresh process.
IN_TURN = """
import json, os, random, sys
import numpy as np
import torch
from typer.testing import CliRunner
from vitcompact.cli.app import app
torch_start = torch.initial_seed()
for args in json.loads(sys.argv[1]):
    random.seed(os.urandom(32))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(torch_start)
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        sys.exit(f"{args} failed: {result.exit_code}\\n{result.output[-2000:]}\\n{result.exception!r}")
"""


def _cli_in_turn(*runs: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", IN_TURN, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """<root>/a/<case> and <root>/b/<case>: every case run once in process a and once in process b;
    <root>/c: training with another seed (in process b, after its cases)."""
    root = tmp_path_factory.mktemp("reproducible")
    for twin in ("a", "b"):
        extra = [[*OTHER_SEED, "--out", str(root / "c")]] if twin == "b" else []
        _cli_in_turn(*([*args, "--out", str(root / twin / case)] for case, args in CASES.items()), *extra)
    return root


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
def test_train_twice_gives_identical_weights_and_metrics(runs):
    _assert_identical(runs / "a" / "train", runs / "b" / "train", ["model.safetensors"])
    assert not (_tensors(runs / "c" / "model.safetensors")["head.weight"] == _tensors(
        runs / "a" / "train" / "model.safetensors")["head.weight"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rsst", "oneshot"])
def test_prune_twice_gives_identical_weights_masks_and_metrics(runs, method):
    _assert_identical(runs / "a" / method, runs / "b" / method, ["model.safetensors", "masks.safetensors"])
