"""CLI commands on tiny models: success paths and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.prune import PruneMasks

runner = CliRunner()


def one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A masked dense artifact and its masks file, as `vitcompact prune` leaves them."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2)
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), head_ratio=0.5, mlp_ratio=0.5)
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(pruned, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--out", str(locked)]),
                       "is not writable")
    finally:
        locked.chmod(0o700)


def test_mismatched_masks_are_refused(pruned, tmp_path):
    other = vc.create_model("vit-digits", depth=3)
    PruneMasks.ones(other).save(tmp_path / "other.safetensors")
    one_line_error(runner.invoke(app, ["compact", str(pruned / "pruned"), "--masks", str(tmp_path / "other.safetensors"),
                                       "--out", str(tmp_path / "o")]), "masks do not match")
    assert not (tmp_path / "o").exists()


def test_pipeline_config_errors(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("model = 'vit-digits'\n[prune]\nhead_ratios = 0.3\n")
    one_line_error(runner.invoke(app, ["pipeline", "--config", str(bad)]), "unknown key(s) head_ratios")
    bad.write_text("model = [\n")
    one_line_error(runner.invoke(app, ["pipeline", "--config", str(bad)]), "is not valid TOML")
    one_line_error(runner.invoke(app, ["pipeline", "--config", str(tmp_path / "nope.toml")]), "does not exist")


def test_pipeline_runs_end_to_end_from_a_config_file(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text(
        'model = "vit-digits"\n[train]\ntrain_epochs = 1\n[prune]\nmethod = "rsst"\nhead_ratio = 0.5\n'
        "mlp_ratio = 0.5\nstates = 1\nepochs_per_state = 1\nfinetune_epochs = 0\n"
        "[int8]\ncalib_batches = 2\nmax_accuracy_drop = 100.0\n[bench]\nbatch_sizes = [2]\nbench_seconds = 0.5\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["structure"] == "8/16 heads, 256/512 neurons kept"
    assert summary["compact_vs_masked_max_abs_diff"] <= 1e-5
    assert summary["params"] == {"dense": 136138, "compact": 69962}
    assert [row["batch"] for row in summary["latency"]] == [2]
    assert summary["accuracy"]["compact_onnx_test_top1"] == pytest.approx(
        summary["accuracy"]["compact_test_top1"], abs=0.01)
    int8 = summary["int8"]
    assert (int8["mode"], int8["calibration"], int8["calibration_images"], int8["file"]) == (
        "static", "minmax", 2 * 64, "compact.int8.onnx")
    assert int8["accuracy"]["test"]["fp32"] == summary["accuracy"]["compact_onnx_test_top1"]
    assert summary["files"]["int8_onnx"] == str(out / "compact.int8.onnx")
    row = summary["latency"][0]
    assert row["int8_p50_ms"] > 0 and row["int8_speedup"] == pytest.approx(row["dense_p50_ms"] / row["int8_p50_ms"],
                                                                          rel=0.5)
    for name in ("report.md", "summary.json", "compact.onnx", "dense.onnx", "compact/config.json",
                 "compact/model.safetensors", "bench/bench.png", "prune/masks.safetensors", "compact.int8.onnx",
                 "bench-int8/bench.json"):
        assert (out / name).is_file(), name
    assert (out / "bench/bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| params | 136,138 | 69,962 |" in report and "![latency](bench/bench.png)" in report
    assert f"| test top-1 (ONNX INT8) | | {int8['accuracy']['test']['int8']:.4f} |" in report
    assert "compact INT8 p50 (ms) | stacked speed-up [95% CI] |" in report
    assert [p.name for p in out.rglob(".*.tmp")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml", "run"]  # no partial folder left
    again = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out)])
    one_line_error(again, f"{out} already exists and is not empty; pass --overwrite")
    assert json.loads((out / "summary.json").read_text())["config"]["out"] == str(out)


def test_pipeline_goes_on_without_a_refused_int8_file(tmp_path, monkeypatch):
    from vitcompact.cli import workflow
    from vitcompact.export import AccuracyDropError

    def refuse(src, config=None, data=None, **_):
        raise AccuracyDropError("static INT8 loses 3.00 points of validation top-1, more than the allowed 1")
    monkeypatch.setattr(workflow, "to_int8", refuse)
    config = tmp_path / "p.toml"
    config.write_text('train_epochs = 0\nmethod = "oneshot"\nfinetune_epochs = 0\nbatch_sizes = [2]\n'
                      "bench_seconds = 0.5\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["int8"] == {"mode": "static", "refused": "static INT8 loses 3.00 points of validation top-1, "
                                                            "more than the allowed 1"}
    assert "int8_p50_ms" not in summary["latency"][0] and "int8_onnx" not in summary["files"]
    assert not (out / "compact.int8.onnx").exists() and not (out / "bench-int8").exists()
    assert "INT8 (static) not written: static INT8 loses 3.00 points" in (out / "report.md").read_text()


def test_pipeline_bad_flags(tmp_path):
    one_line_error(runner.invoke(app, ["pipeline", "--head-ratio", "1.2", "--out", str(tmp_path / "r")]),
                   "head_ratio must be in [0, 1), got 1.2")
    one_line_error(runner.invoke(app, ["pipeline", "--model", "resnet18", "--out", str(tmp_path / "r")]),
                   "not a timm VisionTransformer")
    one_line_error(runner.invoke(app, ["pipeline", "--data", "imagefolder", "--data-root", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "r")]), "nope")


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
    ("tensorrt-missing", ["export", "tensorrt", "{root}/missing.onnx", "{root}/o.engine"], ""),
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
    ("prune-lambda-base", ["prune", "vit-digits", "--lambda-base", "-1", "--out", "{root}/p"],
     "lambda base must be > 0, got -1.0"),
    ("prune-missing-data", ["prune", "vit-digits", "--data", "fashion-mnist", "--data-root", "{root}/none",
                            "--out", "{root}/p"], "none"),
    ("prune-corrupt-checkpoint", ["prune", "vit-digits", "--checkpoint", "{root}/corrupt.pth", "--out",
                                  "{root}/p"], "could not be read as a weights-only checkpoint"),
    ("compact-non-vit", ["compact", "resnet18", "--out", "{root}/c"], "not a timm VisionTransformer"),
    ("pipeline-ratio", ["pipeline", "--mlp-ratio", "-0.1", "--out", "{root}/r"], "mlp_ratio must be in [0, 1)"),
]


@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_every_command_refuses_bad_input_in_one_line(bad_files, name, args, message):
    before = sorted(p.name for p in bad_files.iterdir())
    result = runner.invoke(app, [a.format(root=bad_files) for a in args])
    one_line_error(result, message)
    assert sorted(p.name for p in bad_files.iterdir()) == before  # nothing (half-)written
