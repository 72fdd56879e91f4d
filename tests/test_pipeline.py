"""The pipeline as a library call and through `vitcompact pipeline`: nested stage configs, TOML,
progress, the stacked INT8 stage, the report, and the run folder's replacement."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.bench import BenchConfig
from vitcompact.cli.app import app
from vitcompact.cli.pipeline_cmd import quick_demo
from vitcompact.errors import ConfigError
from vitcompact.export import AccuracyDropError, DeployConfig, Int8Config
from vitcompact.export.int8 import SplitAccuracy
from vitcompact.pipeline import DataConfig, PipelineConfig, PipelineResult, PipelineSummary, run
from vitcompact.pipeline.config import config_dict
from vitcompact.models.merge_config import TokenMergeConfig
from vitcompact.pruning.configs import OneShotConfig

from conftest import one_line_error

runner = CliRunner()

TINY_TOML = (
    'model = "vit-digits"\n[train]\nepochs = 1\n[prune]\nmethod = "rsst"\nhead_ratio = 0.5\n'
    "mlp_ratio = 0.5\nstates = 1\nepochs_per_state = 1\nfinetune_epochs = 0\n"
    "[int8]\ncalib_batches = 2\nmax_accuracy_drop = 100.0\n[bench]\nbatch_sizes = [2]\ntime_budget_s = 0.5\n"
    "[deploy]\nenabled = false\n")


def tiny(out, **changes) -> PipelineConfig:
    """A pipeline run of a few seconds: one training epoch, one pruning state, a short bench, no deploy stage."""
    config = PipelineConfig(
        out=str(out), train=vc.TrainConfig(epochs=1, lr=3e-3),
        prune=OneShotConfig(head_ratio=0.5, mlp_ratio=0.5, finetune_epochs=1),
        int8=Int8Config(mode="static", calib_batches=2, max_accuracy_drop=None),
        bench=BenchConfig(batch_sizes=(2,), threads=1, time_budget_s=0.5), deploy=None)
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


def test_library_run_reaches_every_nested_setting(tmp_path, digits_two_blocks):
    """Settings the old flat config could not express reach their stage, and the run reports progress."""
    config = tiny(tmp_path / "run", seed=3, model=digits_two_blocks)
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
    assert summary.config["prune"]["lambda_schedule"] == "x^2" and summary.config["out"] == str(result.out)
    written = json.loads((result.out / "summary.json").read_text())
    assert written == summary.to_dict() and PipelineSummary.from_dict(written) == summary
    assert PipelineSummary.read(result.out / "summary.json") == summary
    assert PipelineSummary.from_dict(summary.to_dict()) == summary
    assert summary.int8.accuracy["val"].images > 0 and summary.latency[0].stacked and summary.deploy is None


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


# One run, without INT8, replacing an earlier run folder (overwrite), that the deploy stage measures three
# candidates in where OpenVINO is installed: two tests assert on it.
DEPLOY = DeployConfig(batch_sizes=(2,), threads=1, candidates=("onnxruntime fp32", "onnxruntime int8", "openvino f32"),
                      time_budget_s=0.01, retime_rounds=1, max_accuracy_drop=50.0)


@pytest.fixture(scope="module")
def overwritten(tmp_path_factory, digits_two_blocks):
    """(folder the run folder is in, the run's result, its progress) of a run over a folder that held
    old-file.txt; with the deploy stage of DEPLOY where OpenVINO is installed, without one elsewhere."""
    root = tmp_path_factory.mktemp("overwritten")
    out = root / "run"
    out.mkdir()
    (out / "old-file.txt").write_text("from an earlier run")
    deploy = DEPLOY if importlib.util.find_spec("openvino") is not None else None
    progress = Recorder()
    result = run(tiny(out, model=digits_two_blocks, train=vc.TrainConfig(epochs=0), int8=None, deploy=deploy,
                      overwrite=True), progress=progress)
    return root, result, progress


def test_pipeline_overwrite_replaces_the_folder_whole(overwritten):
    root, result, _ = overwritten
    out = root / "run"
    assert result.out == out and not (out / "old-file.txt").exists()
    assert result.summary.int8 is None and not (out / "compact.int8.onnx").exists()
    assert not result.summary.latency[0].stacked
    assert "int8_p50_ms" not in json.loads((out / "summary.json").read_text())["latency"][0]
    assert sorted(p.name for p in root.iterdir()) == ["run"]


def test_pipeline_goes_on_without_a_refused_int8_file_or_openvino(tmp_path, monkeypatch, digits_two_blocks):
    from vitcompact.pipeline import stages

    def refuse(src, config=None, data=None, **_):
        raise AccuracyDropError("static INT8 loses 3.00 points of validation top-1, more than the allowed 1")
    monkeypatch.setattr(stages, "to_int8", refuse)
    monkeypatch.setitem(sys.modules, "openvino", None)
    progress = Recorder()
    # The default deploy stage, on a machine without OpenVINO: skipped, saying so.
    result = run(tiny(tmp_path / "run", model=digits_two_blocks, train=vc.TrainConfig(epochs=0),
                      deploy=PipelineConfig().deploy), progress=progress)
    message = "static INT8 loses 3.00 points of validation top-1, more than the allowed 1"
    no_openvino = "OpenVINO is not installed; pip install 'vitcompact[openvino]'"
    assert result.summary.to_dict()["int8"] == {"mode": "static", "refused": message}
    assert result.summary.to_dict()["deploy"] == {"skipped": no_openvino}
    assert progress.notes == [f"INT8 refused: {message}", f"deploy skipped: {no_openvino}"]
    assert not (result.out / "deploy").exists() and "deploy" not in result.files
    assert f"Not run: {no_openvino}" in (result.out / "report.md").read_text()
    assert not result.summary.latency[0].stacked and "int8_onnx" not in result.files
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
            ("[data]\nsource = 'nosuch'\n", "[data] unknown data source 'nosuch'"),
            ("[deploy]\nenabled = 'yes'\n", "[deploy] enabled must be true or false, got 'yes'"),
            ("[deploy]\nseed = 3\n", "[deploy] seed cannot be set here: set `seed` at the top level"),
            ("[deploy]\ncandidates = ['tensorrt fp16']\n", "[deploy] unknown deploy candidate 'tensorrt fp16'"),
            ("[prune.token_merge]\nr = 2\n", "[prune] token_merge cannot be set here: set token merging in the "
                                              "[token_merge] section"),
            ("[prune]\nfinetune_token_merge = true\n",
             "[prune] finetune_token_merge needs token merging: [token_merge] r >= 1")):
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


def test_the_prune_fine_tunes_with_the_pipelines_one_merge(tmp_path, monkeypatch):
    """`[prune] finetune_token_merge` hands the `[token_merge]` setting to the prune; the compact
    stage gets a model without it and merges the compact model itself (measured with and without)."""
    from vitcompact.pipeline import stages
    path = tmp_path / "p.toml"
    path.write_text('[prune]\nfinetune_token_merge = true\n[token_merge]\nr = 2\n')
    config = PipelineConfig.from_toml(path)
    assert config.prune.finetune_token_merge and config.prune.token_merge is None
    seen = []

    def fake_prune(model, bundle, prune_config, run, notes=None):
        seen.append(prune_config.token_merge)
        vc.merge_tokens(model, prune_config.token_merge)
        return types.SimpleNamespace(model=model, masks=vc.PruneMasks.ones(model), budget=None)

    monkeypatch.setattr(stages, "prune", fake_prune)
    model = vc.create_model("vit-digits", depth=2)
    pruned, _, _ = stages._prune(model, None, config, tmp_path, stages.Silent())
    assert seen == [TokenMergeConfig(r=2)] and vc.get_record(pruned).token_merge is None


def test_the_compact_model_merges_as_the_section_or_the_budget_says():
    from vitcompact.latency import BudgetRequest
    from vitcompact.pipeline.stages import _merge
    chose = {"token_merge": {"r": 3, "schedule": "constant"}}
    assert _merge(PipelineConfig(), None) is None and _merge(PipelineConfig(), {"token_merge": None}) is None
    assert _merge(PipelineConfig(), chose) == TokenMergeConfig(r=3)
    assert _merge(PipelineConfig(token_merge=TokenMergeConfig(r=2)), None) == TokenMergeConfig(r=2)
    with pytest.raises(ConfigError, match="chooses the token merging r itself; drop \\[token_merge\\]"):
        PipelineConfig(token_merge=TokenMergeConfig(r=2),
                       budget=BudgetRequest(target_speedup=2.0, axes="heads,mlp,tokens"))


def test_deploy_section_and_flag():
    """`[deploy]` is DeployConfig's keys and `enabled`; the pipeline's default is a quick measurement."""
    from vitcompact.pipeline.config import build, with_overrides
    default = PipelineConfig().deploy
    assert default == DeployConfig(batch_sizes=(1, 8), time_budget_s=0.5)
    assert build(PipelineConfig, {"deploy": {"enabled": False}}).deploy is None
    assert build(PipelineConfig, {"deploy": {"enabled": True, "batch_sizes": [4]}}).deploy == \
        DeployConfig(batch_sizes=(4,), time_budget_s=0.5)
    off = with_overrides(PipelineConfig(), **{"deploy.enabled": False})
    assert off.deploy is None and with_overrides(off, **{"deploy.enabled": True}).deploy == default
    assert with_overrides(off, **{"deploy.threads": 2}).deploy == DeployConfig(batch_sizes=(1, 8), time_budget_s=0.5,
                                                                                threads=2)
    assert with_overrides(off, **{"deploy.enabled": None}).deploy is None
    text = " ".join(runner.invoke(app, ["pipeline", "--help"]).output.replace("│", " ").split())
    assert "--no-deploy" in text and "[deploy] in a config file" in text  # not swallowed by rich markup


def test_the_quick_demo_runs_every_stage_of_the_demo_with_less_training_and_timing():
    demo, quick = PipelineConfig(out="o", overwrite=True), quick_demo("o")
    assert (quick.train.epochs, quick.prune.finetune_epochs, quick.bench.batch_sizes, quick.bench.time_budget_s,
            quick.deploy.batch_sizes, quick.deploy.time_budget_s, quick.deploy.int8_source) == \
        (3, 2, (1, 32), 1.0, (1,), 0.2, "qdq")
    same = dict(train=dataclasses.replace(demo.train, epochs=3),
                prune=dataclasses.replace(demo.prune, finetune_epochs=2),
                bench=dataclasses.replace(demo.bench, batch_sizes=(1, 32), time_budget_s=1.0),
                deploy=dataclasses.replace(demo.deploy, batch_sizes=(1,), time_budget_s=0.2, int8_source="qdq"))
    assert dataclasses.replace(demo, **same) == quick  # every other setting, INT8 and deploy included, as the demo


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
    one_line_error(runner.invoke(app, ["pipeline", "--int8", "fast", "--no-deploy", "--out", str(tmp_path / "r")]),
                   "unknown int8 mode 'fast'")
    assert not (tmp_path / "r").exists()


# The summary: typed, written as summary.json, read back (older files too)

def full_summary() -> PipelineSummary:
    """A summary with every optional part, as a run with token merging, INT8 and a budget writes it."""
    from vitcompact.models.token_merge import TokenMergeConfig
    from vitcompact.pipeline.summary import (Accuracy, DenseCompact, DeploySummary, Int8Summary, LatencyRow,
                                             TokenMergeSummary)
    return PipelineSummary(
        config=config_dict(PipelineConfig()), accuracy=Accuracy(0.9, 0.85, 0.8499),
        structure="8/16 heads, 256/512 neurons kept", params=DenseCompact(100, 60), macs=DenseCompact(1000, 500),
        ideal_speedup=2.0, compact_vs_masked_max_abs_diff=3e-7,
        latency=[LatencyRow(1, 1.0, 0.6, 1.66, (1.5, 1.8), 2.0, 0.4, 2.5, (2.2, 2.7)),
                 LatencyRow(32, 10.0, 5.5, 1.81, (1.7, 1.9), 2.0, 4.0, 2.5, (2.4, 2.6))],
        seconds=12.5, token_merge=TokenMergeSummary(TokenMergeConfig(r=2), 0.86, 0.85, 600, 500),
        onnx_graph_optimised=True, onnx_parity={"dense": None, "compact": {"max_abs_diff": 1e-6}},
        int8=Int8Summary("static", "compact.int8.onnx", calibration="minmax", calibration_images=128,
                         accuracy={"val": SplitAccuracy(72, 0.9, 0.89), "test": SplitAccuracy(72, 0.85, 0.84)},
                         settings={"calib_batches": 2, "calibration_split": "train"}),
        latency_budget={"requested_speedup": 1.5}, deploy=DeploySummary(skipped="OpenVINO is not installed"))


def test_summary_round_trips_through_its_json():
    summary = full_summary()
    written = json.loads(json.dumps(summary.to_dict()))
    assert PipelineSummary.from_dict(written) == summary
    assert written["latency"][0]["int8_speedup_ci"] == [2.2, 2.7]
    assert written["int8"]["accuracy"]["val"] == {"images": 72, "fp32": 0.9, "int8": 0.89, "drop_points": 1.0}
    assert written["token_merge"] == {**summary.token_merge.config.to_dict(),
                                      "test_top1": {"without": 0.86, "with": 0.85}, "macs": {"without": 600, "with": 500}}
    # The keys summary.json has always had, and the deploy stage's.
    assert list(written) == ["config", "accuracy", "structure", "params", "macs", "ideal_speedup",
                             "compact_vs_masked_max_abs_diff", "token_merge", "onnx_graph_optimised", "onnx_parity",
                             "int8", "latency", "latency_budget", "deploy", "seconds"]
    plain = dataclasses.replace(summary, int8=None, token_merge=None, deploy=None, latency_budget=None,
                                latency=[dataclasses.replace(row, int8_p50_ms=None, int8_speedup=None,
                                                             int8_speedup_ci=None) for row in summary.latency])
    assert "int8_p50_ms" not in plain.to_dict()["latency"][0]
    assert PipelineSummary.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_an_older_summary_still_loads(tmp_path):
    """A summary.json without the parts added since (token merging, budget, deploy, graph optimiser) and
    with a key this version does not know loads, and renders."""
    older = full_summary().to_dict()
    for key in ("token_merge", "latency_budget", "deploy", "onnx_graph_optimised", "onnx_parity"):
        del older[key]
    older["from_a_later_version"] = {"x": 1}
    older["accuracy"]["also_later"] = 0.5
    summary = PipelineSummary.from_dict(older)
    assert (summary.token_merge, summary.latency_budget, summary.deploy, summary.onnx_graph_optimised) == \
        (None, None, None, None)
    assert summary.accuracy.compact_test_top1 == 0.85 and summary.int8.accuracy["test"].int8 == 0.84
    from pathlib import Path
    from vitcompact.pipeline import render_report
    text = render_report(summary, Path("bench/bench.png"))
    assert "ONNX graphs" not in text and "Deployment" not in text and "| 32 | 10.000 | 5.500 |" in text
    del older["accuracy"]
    with pytest.raises(vc.ArtifactError, match="not a pipeline summary: it lacks 'accuracy'"):
        PipelineSummary.from_dict(older)
    bad = tmp_path / "summary.json"
    bad.write_text("[1, 2]")
    with pytest.raises(vc.ArtifactError, match="is not a pipeline summary"):
        PipelineSummary.read(bad)


def test_pipeline_reports_the_measured_choice_of_runtime_and_precision(overwritten):
    """The deploy stage on the compact model: every candidate in the report's table (deploy.md's table),
    one chosen, the chosen files in deploy/."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (vitcompact[openvino])")
    # Three candidates: both runtimes and an INT8 file (`vitcompact deploy`'s tests measure all five).
    candidates = DEPLOY.candidates
    _, result, progress = overwritten
    out, deployed = result.out, result.summary.deploy
    assert "measured choice of runtime and precision (3 candidates)" in progress.stages
    statuses = {f"{c['runtime']} {c['precision']}": c["status"] for c in deployed.report["candidates"]}
    assert set(statuses) == set(candidates)
    assert [label for label, status in statuses.items() if status == "chosen"] == [deployed.chosen]
    report = (out / "report.md").read_text()
    assert "## Deployment: the measured choice of runtime and precision" in report
    rows = [line for line in report.splitlines() if line.startswith(("| onnxruntime |", "| openvino |"))]
    assert sorted(" ".join(row.split(" | ")[:2])[2:] for row in rows) == sorted(statuses)
    assert [row for row in rows if row.endswith("| chosen |")] == [
        row for row in rows if row.startswith(f"| {deployed.chosen.replace(' ', ' | ')} |")]
    # One table, rendered by deploy's own function: the same as deploy.md's.
    assert deployed.table() in report and deployed.table() in (out / "deploy" / "deploy.md").read_text()
    written = json.loads((out / "summary.json").read_text())
    assert written["deploy"] == json.loads((out / "deploy" / "deploy.json").read_text())
    assert PipelineSummary.from_dict(written) == result.summary
    assert result.files["deploy"] == str(out / "deploy")
    assert all((out / "deploy" / name).is_file() for name in deployed.report["files"])
    assert [p.name for p in out.rglob("*.tmp-*")] == []
