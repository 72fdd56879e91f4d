"""The pipeline as a library call and through `vitcompact pipeline`: nested stage configs, TOML,
progress, the stacked INT8 stage, the report, and the run folder's replacement."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.bench import BenchConfig
from vitcompact.cli.app import app
from vitcompact.errors import ConfigError
from vitcompact.export import AccuracyDropError, Int8Config
from vitcompact.pipeline import DataConfig, PipelineConfig, PipelineResult, run
from vitcompact.pruning.configs import OneShotConfig

from conftest import one_line_error

runner = CliRunner()

TINY_TOML = (
    'model = "vit-digits"\n[train]\nepochs = 1\n[prune]\nmethod = "rsst"\nhead_ratio = 0.5\n'
    "mlp_ratio = 0.5\nstates = 1\nepochs_per_state = 1\nfinetune_epochs = 0\n"
    "[int8]\ncalib_batches = 2\nmax_accuracy_drop = 100.0\n[bench]\nbatch_sizes = [2]\ntime_budget_s = 0.5\n")


def tiny(out, **changes) -> PipelineConfig:
    """A pipeline run of a few seconds: one training epoch, one pruning state, a short bench."""
    config = PipelineConfig(
        out=str(out), train=vc.TrainConfig(epochs=1, lr=3e-3),
        prune=OneShotConfig(head_ratio=0.5, mlp_ratio=0.5, finetune_epochs=1),
        int8=Int8Config(mode="static", calib_batches=2, max_accuracy_drop=None),
        bench=BenchConfig(batch_sizes=(2,), threads=1, time_budget_s=0.5))
    return dataclasses.replace(config, **changes)


def params_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Recorder:
    """A Progress that records what the run announced."""

    bars = False

    def __init__(self):
        self.stages, self.steps, self.notes = [], {}, []

    @contextlib.contextmanager
    def stage(self, name, total=None):
        self.stages.append(name)
        self.steps[name] = 0

        def advance(*_):
            self.steps[name] += 1
        yield advance

    def note(self, message):
        self.notes.append(message)


def test_library_run_reaches_every_nested_setting(tmp_path):
    """Settings the old flat config could not express reach their stage, and the run reports progress."""
    config = tiny(tmp_path / "run", seed=3)
    config.prune = vc.RSSTConfig(head_ratio=0.5, mlp_ratio=0.5, states=1, epochs_per_state=1, finetune_epochs=0,
                                 lambda_schedule="x^2", round_to=8, min_keep=2)
    progress = Recorder()
    result = run(config, progress=progress)
    assert isinstance(result, PipelineResult) and result.out == tmp_path / "run"
    recorded = json.loads((tmp_path / "run" / "prune" / "run.json").read_text())
    assert (recorded["lambda_schedule"], recorded["round_to"], recorded["min_keep"], recorded["seed"]) == \
        ("x^2", 8, 2, 3)
    compact = vc.load(tmp_path / "run" / "compact")
    assert all(b.mlp.fc1.out_features % 8 == 0 for b in compact.blocks)
    assert progress.stages == ["train dense model (1 epochs)", "rsst pruning (heads 0.5, MLP 0.5)",
                               "compact and evaluate", "export ONNX, verify, evaluate",
                               "static INT8 of the compact model, measured on validation and test",
                               "benchmark dense vs compact (ort-cpu)"]
    assert progress.steps["compact and evaluate"] == 2 and progress.steps["export ONNX, verify, evaluate"] == 3
    assert progress.steps["benchmark dense vs compact (ort-cpu)"] == 2  # one batch size, two files
    summary = result.summary
    assert summary["config"]["prune"]["lambda_schedule"] == "x^2" and summary["config"]["out"] == str(result.out)
    assert json.loads((result.out / "summary.json").read_text()) == summary


def test_pipeline_runs_end_to_end_from_a_config_file(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["structure"] == "8/16 heads, 256/512 neurons kept"
    assert summary["compact_vs_masked_max_abs_diff"] <= 1e-5
    # Counted from the saved tensors, not by the accounting code under test.
    dense_params, compact_params = params_of(vc.load(out / "dense")), params_of(vc.load(out / "compact"))
    assert summary["params"] == {"dense": dense_params, "compact": compact_params}
    assert dense_params == params_of(vc.create_model("vit-digits"))
    assert [row["batch"] for row in summary["latency"]] == [2]
    assert summary["accuracy"]["compact_onnx_test_top1"] == pytest.approx(
        summary["accuracy"]["compact_test_top1"], abs=0.01)
    int8 = summary["int8"]
    assert (int8["mode"], int8["calibration"], int8["calibration_images"], int8["file"]) == (
        "static", "minmax", 2 * 64, "compact.int8.onnx")
    assert int8["accuracy"]["test"]["fp32"] == summary["accuracy"]["compact_onnx_test_top1"]
    assert summary["files"]["int8_onnx"] == str(out / "compact.int8.onnx")
    row = summary["latency"][0]
    stacked = json.loads((out / "bench-int8" / "bench.json").read_text())["batches"][0]
    assert row["int8_p50_ms"] == stacked["compact"]["p50"] and row["int8_speedup"] == stacked["speedup"]["value"]
    for name in ("report.md", "summary.json", "compact.onnx", "dense.onnx", "compact/config.json",
                 "compact/model.safetensors", "bench/bench.png", "prune/masks.safetensors", "compact.int8.onnx",
                 "bench-int8/bench.json"):
        assert (out / name).is_file(), name
    assert (out / "bench/bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"| params | {dense_params:,} | {compact_params:,} |" in report and "![latency](bench/bench.png)" in report
    assert f"| test top-1 (ONNX INT8) | | {int8['accuracy']['test']['int8']:.4f} |" in report
    assert "compact INT8 p50 (ms) | stacked speed-up [95% CI] |" in report
    assert [p.name for p in out.rglob(".*.tmp")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml", "run"]  # no partial folder left
    again = runner.invoke(app, ["pipeline", "--config", str(config), "--out", str(out)])
    one_line_error(again, f"{out} already exists and is not empty; pass --overwrite")
    assert json.loads((out / "summary.json").read_text())["config"]["out"] == str(out)


def test_pipeline_overwrite_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old-file.txt").write_text("from an earlier run")
    result = run(tiny(out, int8=None, overwrite=True))
    assert not (out / "old-file.txt").exists()
    assert result.summary["int8"] is None and not (out / "compact.int8.onnx").exists()
    assert "int8_p50_ms" not in result.summary["latency"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_pipeline_goes_on_without_a_refused_int8_file(tmp_path, monkeypatch):
    from vitcompact.pipeline import stages

    def refuse(src, config=None, data=None, **_):
        raise AccuracyDropError("static INT8 loses 3.00 points of validation top-1, more than the allowed 1")
    monkeypatch.setattr(stages, "to_int8", refuse)
    progress = Recorder()
    result = run(tiny(tmp_path / "run", train=vc.TrainConfig(epochs=0)), progress=progress)
    message = "static INT8 loses 3.00 points of validation top-1, more than the allowed 1"
    assert result.summary["int8"] == {"mode": "static", "refused": message}
    assert progress.notes == [f"INT8 refused: {message}"]
    assert "int8_p50_ms" not in result.summary["latency"][0] and "int8_onnx" not in result.files
    assert not (result.out / "compact.int8.onnx").exists() and not (result.out / "bench-int8").exists()
    assert f"INT8 (static) not written: {message}" in (result.out / "report.md").read_text()


def test_config_file_errors(tmp_path):
    bad = tmp_path / "p.toml"
    for text, message in (
            ("model = 'vit-digits'\n[prune]\nhead_ratios = 0.3\n", "[prune] unknown key(s) head_ratios"),
            ("model = [\n", "is not valid TOML"),
            ("train_epochs = 3\n", "train_epochs is not a top-level key; it is now [train] epochs"),
            ("bench_seconds = 3.0\n", "it is now [bench] time_budget_s"),
            ("[prune]\nseed = 3\n", "[prune] seed cannot be set here: set `seed` at the top level"),
            ("[prune]\nout_dir = 'x'\n", "[prune] out_dir cannot be set here: the pipeline prunes into <out>/prune"),
            ("[prune]\nstates = 2\n", "[prune] states is a setting of rsst and refill, not of oneshot (set method first)"),
            ("[int8]\nmode = 'fast'\n", "[int8] unknown int8 mode 'fast'"),
            ("[data]\nsource = 'nosuch'\n", "[data] unknown data source 'nosuch'")):
        bad.write_text(text)
        one_line_error(runner.invoke(app, ["pipeline", "--config", str(bad)]), message)
    one_line_error(runner.invoke(app, ["pipeline", "--config", str(tmp_path / "nope.toml")]), "does not exist")


def test_config_file_builds_nested_configs_and_flags_override_it(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('seed = 4\n[data]\nsource = "digits"\nbatch_size = 32\n[prune]\nmethod = "refill"\n'
                    'rewind = "epoch"\ndense_epochs = 2\ndistill = true\n[prune.train]\nlabel_smoothing = 0.0\n'
                    '[int8]\nmode = "none"\n[bench]\nbatch_sizes = [1, 4]\n')
    config = PipelineConfig.from_toml(path)
    assert config.data == DataConfig(source="digits", batch_size=32) and config.seed == 4
    assert (config.prune.method, config.prune.rewind, config.prune.dense_epochs, config.prune.distill) == \
        ("refill", "epoch", 2, True)
    assert config.prune.train.label_smoothing == 0.0 and config.int8 is None
    assert config.bench.batch_sizes == (1, 4) and config.bench.threads == 1  # the pipeline's default kept
    from vitcompact.pipeline.config import with_overrides
    changed = with_overrides(config, **{"prune.method": "oneshot", "train.epochs": 2, "int8.mode": "dynamic",
                                        "data.source": None})
    # Another method's config: the shared settings carried over, the refill-only ones gone.
    assert (changed.prune.method, changed.prune.distill, changed.train.epochs) == ("oneshot", True, 2)
    assert changed.prune.train.label_smoothing == 0.0 and not hasattr(changed.prune, "rewind")
    assert changed.int8.mode == "dynamic" and changed.data.source == "digits"
    assert config.prune.method == "refill"  # the original is not changed
    with pytest.raises(ConfigError, match="head_ratio must be in"):
        with_overrides(config, **{"prune.head_ratio": 1.5})


def test_the_example_config_is_the_demo_configuration():
    from pathlib import Path
    example = PipelineConfig.from_toml(Path(__file__).parents[1] / "examples" / "pipeline.toml")
    demo = PipelineConfig(out="runs/pipeline")
    assert dataclasses.replace(example, bench=demo.bench) == demo
    assert example.bench == dataclasses.replace(demo.bench, time_budget_s=8.0)


def test_pipeline_bad_flags(tmp_path):
    one_line_error(runner.invoke(app, ["pipeline", "--head-ratio", "1.2", "--out", str(tmp_path / "r")]),
                   "head_ratio must be in [0, 1), got 1.2")
    one_line_error(runner.invoke(app, ["pipeline", "--model", "resnet18", "--out", str(tmp_path / "r")]),
                   "not a timm VisionTransformer")
    one_line_error(runner.invoke(app, ["pipeline", "--data", "imagefolder", "--data-root", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "r")]), "nope")
    one_line_error(runner.invoke(app, ["pipeline", "--int8", "fast", "--out", str(tmp_path / "r")]),
                   "unknown int8 mode 'fast'")
    assert not (tmp_path / "r").exists()
