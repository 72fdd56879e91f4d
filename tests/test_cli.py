"""CLI commands on tiny models: success paths and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.pruning import PruneMasks

from conftest import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A masked dense artifact and its masks file, as `vitcompact prune` leaves them."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2)
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(head_ratio=0.5, mlp_ratio=0.5))
    masks.apply_(model)
    vc.save(model, root / "pruned")
    masks.save(root / "masks.safetensors")
    return root


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = set(re.findall(r"^\W+(\w+)\s{2,}\S", result.output, flags=re.M))
    commands = {"train", "prune", "compact", "export", "bench", "inspect", "pipeline", "demo"}
    assert commands <= listed
    for command in commands - {"export"}:
        assert "Example:" in runner.invoke(app, [command, "--help"]).output, command
    for sub in ("onnx", "tensorrt"):
        assert "Example:" in runner.invoke(app, ["export", sub, "--help"]).output, sub


def test_compact_command(pruned, tmp_path):
    out = tmp_path / "compact"
    result = runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(pruned / "masks.safetensors"),
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["compact"]["heads"] == 4 and summary["compact"]["neurons"] == 128
    small = vc.load(out)
    assert [b.attn.num_heads for b in small.blocks] == [2, 2]
    # without --masks the masks come from the zero weights and give the same model
    again = runner.invoke(app, ["compact", str(pruned / "pruned"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(vc.load(tmp_path / "again")(x), small(x))


def test_compact_bad_inputs_leave_nothing_behind(pruned, tmp_path):
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, ["compact", str(tmp_path / "missing"), "--out", str(out)]),
                   "missing does not exist")
    assert not out.exists()
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(tmp_path / "none.safetensors"),
                                       "--out", str(out)]), "does not exist")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(tmp_path / "bad.safetensors"),
                                       "--out", str(out)]), "is not a readable safetensors mask file")
    (tmp_path / "bad.pth").write_bytes(b"corrupt checkpoint")
    one_line_error(runner.invoke(app, ["compact", "vit-digits", "--checkpoint", str(tmp_path / "bad.pth"),
                                       "--out", str(out)]), "could not be read as a weights-only checkpoint")
    one_line_error(runner.invoke(app, ["compact", "resnet18", "--out", str(out)]), "not a timm VisionTransformer")
    assert not out.exists()
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--out", str(blocker / "sub")]),
                   "cannot create output folder")
    assert blocker.read_text() == "keep me"


def test_unwritable_output_folder(pruned, tmp_path):
    """Mode 0o500 stops a user; root ignores modes, so as root the folder is a read-only mount."""
    locked = tmp_path / "locked"
    locked.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(locked)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(OSError):  # not even root can write into it
            (locked / "probe").touch()
        result = runner.invoke(app, ["compact", str(pruned / "pruned"), "--out", str(locked)])
        left = list(locked.iterdir())
    finally:
        if as_root:
            subprocess.run(["umount", str(locked)], check=True)
        locked.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: output folder {locked} is not writable"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert left == []


def test_mismatched_masks_are_refused(pruned, tmp_path):
    other = vc.create_model("vit-digits", depth=3)
    PruneMasks.ones(other).save(tmp_path / "other.safetensors")
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(tmp_path / "other.safetensors"),
                                       "--out", str(tmp_path / "o")]), "masks do not match")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.pth").write_bytes(b"not a checkpoint")
    (root / "corrupt.onnx").write_bytes(b"not onnx")
    (root / "blocker").write_text("a file where a folder should be")
    return root


# Every command that reads a model, with each kind of bad input: message fragment asserted.
BAD_INPUTS = [
    ("export-missing", ["export", "onnx", "{root}/missing", "{root}/o.onnx"], "missing does not exist"),
    ("export-non-vit", ["export", "onnx", "resnet18", "{root}/o.onnx"], "not a timm VisionTransformer"),
    ("export-unwritable", ["export", "onnx", "vit-digits", "{root}/blocker/o.onnx"], "blocker"),
    ("bench-missing", ["bench", "{root}/missing", "vit-digits"], "missing does not exist"),
    ("bench-corrupt-onnx", ["bench", "{root}/corrupt.onnx", "vit-digits"], "is not a readable ONNX file"),
    ("bench-non-vit", ["bench", "resnet18", "vit-digits"], "not a timm VisionTransformer"),
    ("inspect-missing", ["inspect", "{root}/missing"], "missing does not exist"),
    ("train-corrupt-checkpoint", ["train", "vit-digits", "--checkpoint", "{root}/corrupt.pth", "--out",
                                  "{root}/t"], "could not be read as a weights-only checkpoint"),
    ("train-non-vit", ["train", "resnet18", "--out", "{root}/t"], "not a timm VisionTransformer"),
    ("train-unwritable", ["train", "vit-digits", "--out", "{root}/blocker/t"], "blocker"),
    ("prune-ratio", ["prune", "vit-digits", "--head-ratio", "1.0", "--out", "{root}/p"],
     "head_ratio must be in [0, 1), got 1.0"),
    ("prune-foreign-option", ["prune", "vit-digits", "--states", "2", "--out", "{root}/p"],
     "--states is a setting of rsst and refill, not of oneshot"),
    ("prune-ratio-with-budget", ["prune", "vit-digits", "--target-speedup", "2", "--head-ratio", "0.5", "--out",
                                 "{root}/p"], "--head-ratio and --mlp-ratio do not apply with a latency budget"),
    ("prune-budget-flag-without-target", ["prune", "vit-digits", "--deploy-batch", "4", "--out", "{root}/p"],
     "a latency budget takes exactly one of a target speed-up or a latency in ms"),
    ("prune-lambda-base", ["prune", "vit-digits", "--method", "rsst", "--lambda-base", "-1", "--out", "{root}/p"],
     "lambda base must be > 0, got -1.0"),
    ("prune-missing-data", ["prune", "vit-digits", "--data", "fashion-mnist", "--data-root", "{root}/none",
                            "--out", "{root}/p"], "none"),
    ("prune-corrupt-checkpoint", ["prune", "vit-digits", "--checkpoint", "{root}/corrupt.pth", "--out",
                                  "{root}/p"], "could not be read as a weights-only checkpoint"),
    ("compact-non-vit", ["compact", "resnet18", "--out", "{root}/c"], "not a timm VisionTransformer"),
    ("pipeline-ratio", ["pipeline", "--mlp-ratio", "-0.1", "--out", "{root}/r"], "mlp_ratio must be in [0, 1)"),
]


def test_tensorrt_export_refusals_name_their_cause(bad_files, monkeypatch):
    """Where TensorRT is missing, where the GPU is, and (with stand-ins for both) a missing ONNX file."""
    args = ["export", "tensorrt", str(bad_files / "missing.onnx"), str(bad_files / "o.engine")]
    before = sorted(p.name for p in bad_files.iterdir())
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as without the extra
    one_line_error(runner.invoke(app, args), "error: TensorRT is not installed; on a machine with an NVIDIA GPU "
                                             "run pip install 'vitcompact[tensorrt]'")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(runner.invoke(app, args),
                   "error: TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    missing = bad_files / "missing.onnx"
    one_line_error(runner.invoke(app, args),
                   f"error: {missing} does not exist")
    assert sorted(p.name for p in bad_files.iterdir()) == before


@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_every_command_refuses_bad_input_in_one_line(bad_files, name, args, message):
    before = sorted(p.name for p in bad_files.iterdir())
    result = runner.invoke(app, [a.format(root=bad_files) for a in args])
    one_line_error(result, message)
    assert sorted(p.name for p in bad_files.iterdir()) == before  # nothing (half-)written


def test_prune_defaults_to_one_shot(tmp_path):
    """The default method is one-shot (the accuracy study's winner): one cut, no RSST fade."""
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", "vit-digits", "--data", "digits", "--head-ratio", "0.5", "--mlp-ratio", "0.5",
                                 "--finetune-epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["method"] == "oneshot"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["state"] for r in records if r["phase"] == "state_end"] == [1]
    assert [r["epoch"] for r in records if r["phase"] == "finetune"] == [1, 2]
    assert not any("lambda" in r for r in records)
