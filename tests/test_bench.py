"""Latency harness: statistics on synthetic timings, interleaving, result schema, reports, CLI.

These tests check correctness only; they time tiny models for a few runs and assert nothing
about speed.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.bench import (SCHEMA, BenchConfig, BenchModel, benchmark, latency_stats, resolve,
                              speedup_interval, write_report)
from vitcompact.bench.harness import summarise
from vitcompact.latency.timing import measure_pair, plan_rounds
from vitcompact.cli.app import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(threads=1, warmup=1, rounds=3, runs_per_round=2, min_rounds=3, time_budget_s=None)

# MACs per image of the `pair` below, worked out by hand from vit-digits' shape: 8x8x1 input in
# 2x2 patches -> 16 patches + the class token = 17 tokens, width 64, 4 blocks, 10 classes. Per
# block: qkv 17*64*3A, q@k^T and attn@v 2*17*17*A, proj 17*A*64, fc1 and fc2 2*17*64*N, with
# A = kept heads * 16 and N = kept neurons; outside the blocks the patch embedding (16 patches of
# 64*1*2*2) and the head (64*10). Dense: 4 heads, 128 neurons; compact: 2 heads, 64 neurons.
DENSE_MACS = 4 * (17 * 64 * 3 * 64 + 2 * 17 * 17 * 64 + 17 * 64 * 64 + 2 * 17 * 64 * 128) + 16 * 256 + 640
COMPACT_MACS = 4 * (17 * 64 * 3 * 32 + 2 * 17 * 17 * 32 + 17 * 32 * 64 + 2 * 17 * 64 * 64) + 16 * 256 + 640
IDEAL = DENSE_MACS / COMPACT_MACS  # 2380928 / 1192832


@pytest.fixture(scope="module")
def pair():
    """A tiny dense ViT and its compact version (half the heads and neurons removed)."""
    dense = vc.create_model("vit-digits").eval()
    masks = vc.regroup(dense, vc.magnitude_prune(dense, 0.3), vc.RegroupConfig(target="both", head_ratio=0.5,
                       mlp_ratio=0.5))
    compact = vc.compact(dense, masks).eval()
    assert [(b.attn.num_heads, b.mlp.fc1.out_features) for b in compact.blocks] == [(2, 64)] * 4
    return dense, compact


def test_latency_stats_known_percentiles():
    s = latency_stats(list(range(1, 101)), batch_size=4)
    assert (s.p50, s.p90, s.p99) == pytest.approx((50.5, 90.1, 99.01))
    assert s.mean == pytest.approx(50.5)
    assert s.std == pytest.approx(math.sqrt(100 * 101 / 12))  # sample variance of 1..n is n(n+1)/12
    assert s.runs == 100
    assert s.throughput == pytest.approx(4 * 1000 / 50.5)


def test_paired_speedup_cancels_shared_drift():
    # Machine load scales both models alike in each round; the paired ratio stays exactly 2.
    drift = np.linspace(1.0, 3.0, 12)
    compact = [[d * 5.0, d * 5.0] for d in drift]
    dense = [[d * 10.0, d * 10.0] for d in drift]
    s = speedup_interval(dense, compact)
    assert (s.value, s.low, s.high) == pytest.approx((2.0, 2.0, 2.0))


def test_speedup_interval_covers_truth_and_is_seeded():
    rng = np.random.default_rng(1)
    dense = rng.normal(12.0, 0.6, size=(40, 3)).tolist()
    compact = rng.normal(8.0, 0.4, size=(40, 3)).tolist()
    s = speedup_interval(dense, compact, level=0.95, seed=3)
    assert s.low < s.value < s.high
    assert s.low < 1.5 < s.high
    assert s.high - s.low < 0.1
    assert speedup_interval(dense, compact, level=0.95, seed=3) == s
    narrow = speedup_interval(dense, compact, level=0.5, seed=3)
    assert s.low < narrow.low < narrow.high < s.high
    single = speedup_interval([[4.0, 6.0]], [[2.0, 3.0]])
    assert (single.value, single.low, single.high) == pytest.approx((2.0, 2.0, 2.0))


@pytest.mark.parametrize("level", [0.0, 1.0])
def test_speedup_interval_rejects_bad_level(level):
    with pytest.raises(vc.ConfigError):
        speedup_interval([[1.0]], [[1.0]], level=level)


def test_batch_summary_of_known_timings():
    # Medians 10 ms and 4 ms: speed-up 2.5 in every resample; an ideal of 5 makes the efficiency 0.5.
    dense = [[9.0, 11.0], [10.0, 10.0], [12.0, 8.0]]
    compact = [[4.0, 4.0], [3.0, 5.0], [4.0, 4.0]]
    batch = summarise(4, dense, compact, 5.0, BenchConfig())
    assert (batch.dense.p50, batch.compact.p50, batch.rounds) == (10.0, 4.0, 3)
    assert batch.dense.throughput == pytest.approx(400.0)  # 4 images per 10 ms
    d = batch.to_dict()
    assert (d["speedup"]["value"], d["ideal_speedup"], d["efficiency"]) == pytest.approx((2.5, 5.0, 0.5))
    # Each round is symmetric about the median, so every resample has the same ratio.
    assert (d["speedup"]["low"], d["speedup"]["high"]) == pytest.approx((2.5, 2.5))
    assert summarise(4, dense, compact, None, BenchConfig()).to_dict()["efficiency"] is None


def test_plan_rounds_respects_budget_and_floor():
    config = BenchConfig(rounds=20, min_rounds=5, time_budget_s=10.0)
    assert plan_rounds(config, 0.1) == 20
    assert plan_rounds(config, 1.0) == 10
    assert plan_rounds(config, 100.0) == 5
    assert plan_rounds(BenchConfig(rounds=20, time_budget_s=None), 100.0) == 20


def test_rounds_interleave_dense_and_compact():
    calls: list[str] = []
    config = BenchConfig(warmup=2, rounds=4, runs_per_round=3, time_budget_s=None)
    order: list[tuple[str, int]] = []
    dense_ms, compact_ms = measure_pair(lambda: calls.append("A"), lambda: calls.append("B"), 8,
                                        config, order)
    assert calls == ["A", "B"] * 2 + (["A"] * 3 + ["B"] * 3) * 4
    assert order == [("dense", 8), ("compact", 8)] * 4
    assert np.shape(dense_ms) == np.shape(compact_ms) == (4, 3)


def test_torch_benchmark_result_schema_and_report(pair, tmp_path):
    dense, compact = pair
    result = benchmark(dense, compact, BenchConfig(backend="torch", batch_sizes=(1, 4), **FAST))
    d = result.to_dict()
    assert d["schema"] == SCHEMA
    assert [b["batch_size"] for b in d["batches"]] == [1, 4]
    assert d["order"] == [["dense", 1], ["compact", 1]] * 3 + [["dense", 4], ["compact", 4]] * 3
    assert (d["dense"]["macs"], d["compact"]["macs"]) == (DENSE_MACS, COMPACT_MACS)
    assert d["ideal_speedup"] == pytest.approx(IDEAL)
    for b in d["batches"]:
        for side in ("dense", "compact"):
            assert set(b[side]) == {"p50", "p90", "p99", "mean", "std", "runs", "throughput"}
            assert b[side]["runs"] == 6
            assert b[side]["p50"] <= b[side]["p90"] <= b[side]["p99"]
        assert b["speedup"]["low"] <= b["speedup"]["value"] <= b["speedup"]["high"]
        assert b["ideal_speedup"] == pytest.approx(IDEAL)
    env = d["environment"]
    assert env["backend"] == "torch" and env["threads"] == 1
    for key in ("torch", "timm", "onnxruntime", "tensorrt", "cpu", "gpu", "physical_cores"):
        assert key in env
    assert d["config"]["threads"] == 1 and d["config"]["batch_sizes"] == [1, 4]

    paths = write_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(d))
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.pyplot as plt
    assert plt.imread(paths["png"]).shape[:2][0] > 100
    table = [l for l in paths["md"].read_text().splitlines() if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in table[1:]] == ["1", "4"]


def test_ort_benchmark_records_threads_and_graph_level(pair, tmp_path):
    dense, compact = pair
    d_model, c_model = resolve(dense), resolve(compact)
    result = benchmark(d_model, c_model, BenchConfig(backend="ort-cpu", batch_sizes=(2,),
                                                     graph_optimization="extended", **FAST))
    env = result.environment
    assert (env["threads"], env["inter_op_threads"], env["graph_optimization"]) == (1, 1, "extended")
    assert result.batches[0].dense.runs == 6
    assert (d_model.macs, c_model.macs) == (DENSE_MACS, COMPACT_MACS)
    assert result.to_dict()["ideal_speedup"] == pytest.approx(IDEAL)

    # ONNX inputs: the ideal comes from `macs` metadata, and is reported missing without it.
    for side, model in (("dense", d_model), ("compact", c_model)):
        proto = onnx.load(str(model.onnx()))
        del proto.metadata_props[:]
        if side == "dense":
            proto.metadata_props.add(key="macs", value=str(DENSE_MACS))
        onnx.save(proto, str(tmp_path / f"{side}.onnx"))
    assert resolve(str(tmp_path / "dense.onnx")).macs == DENSE_MACS
    result = benchmark(str(tmp_path / "dense.onnx"), str(tmp_path / "compact.onnx"),
                       BenchConfig(backend="ort-cpu", batch_sizes=(1,), **FAST))
    assert result.batches[0].ideal_speedup is None
    paths = write_report(result, tmp_path / "onnx-report")
    assert "Ideal speed-up unknown" in paths["md"].read_text()
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(vc.ConfigError, match="torch backend needs a model"):
        benchmark(str(tmp_path / "dense.onnx"), compact, BenchConfig(backend="torch", **FAST))


def test_dense_fp32_file_against_compact_int8_file(pair, tmp_path):
    """The stacked comparison: any two ONNX files, each side's precision recorded, the ideal from MACs."""
    from vitcompact.export import ExportConfig, Int8Config, to_int8, to_onnx
    dense, compact = pair
    plain = ExportConfig(optimize="off", verify=False)
    dense_onnx = to_onnx(dense, tmp_path / "dense.onnx", plain).path
    int8 = to_int8(to_onnx(compact, tmp_path / "compact.onnx", plain).path, config=Int8Config(mode="dynamic")).path
    result = benchmark(str(dense_onnx), str(int8), BenchConfig(backend="ort-cpu", batch_sizes=(2,), **FAST))
    record = result.to_dict()
    assert (record["dense"]["precision"], record["compact"]["precision"]) == ("fp32", "int8")
    assert record["ideal_speedup"] == pytest.approx(IDEAL)
    assert result.batches[0].compact.runs == 6


@pytest.mark.parametrize("field, value, message", [
    ("runs_per_round", 0, "runs_per_round"), ("batch_sizes", (0, 8), "batch sizes"),
    ("threads", 0, "threads"), ("confidence", 1.5, "confidence"),
    ("onnx_optimize", "maybe", "onnx_optimize"), ("time_budget_s", 0.0, "time_budget_s"),
    ("warmup", -1, "warmup"),
])
def test_bad_config_is_refused_before_timing(field, value, message):
    # The models do not exist: the config must be refused before anything is loaded or timed.
    with pytest.raises(vc.ConfigError, match=message):
        benchmark("no-such-model", "no-such-model", BenchConfig(**{field: value}))


def test_bad_inputs_raise_user_errors(pair):
    dense, compact = pair
    with pytest.raises(vc.ConfigError, match="unknown bench backend"):
        benchmark(dense, compact, BenchConfig(backend="nope"))
    with pytest.raises(vc.ConfigError, match="differ"):
        benchmark(dense, vc.create_model("vit-cifar-tiny"), BenchConfig(backend="torch", **FAST))
    for backend in ("ort-cuda", "tensorrt"):
        if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
            pytest.skip("a GPU provider is installed here")
        with pytest.raises(vc.BackendUnavailableError, match="onnxruntime-gpu"):
            benchmark(dense, compact, BenchConfig(backend=backend))


def test_cli_bench_json_and_report(pair, tmp_path):
    dense, compact = pair
    vc.save(compact, tmp_path / "compact")
    out = tmp_path / "out"
    args = ["bench", "vit-digits", str(tmp_path / "compact"), "--backend", "torch", "--batch-sizes",
            "1,2", "--threads", "1", "--rounds", "2", "--runs-per-round", "1", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [b["batch_size"] for b in d["batches"]] == [1, 2]
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "speed-up" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["vit-digits", "missing.onnx"], "does not exist"),
    (["vit-digits", "vit-digits", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["vit-digits", "vit-digits", "--backend", "nope"], "unknown bench backend"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    r = CliRunner().invoke(app, ["bench", *args])
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --backend auto: deploy's measured choice for the compact model, then the pair timed the chosen way.

AUTO = ["--backend", "auto", "--data", "digits", "--batch-sizes", "1,4", "--threads", "1", "--rounds", "2",
        "--runs-per-round", "1", "--time-budget", "0.01", "--max-accuracy-drop", "50"]


@pytest.fixture(scope="module")
def compact_dir(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("auto") / "compact"
    vc.save(pair[1], path)
    return path


def test_cli_bench_auto_records_the_choice_and_times_the_pair_that_way(compact_dir, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (vitcompact[openvino])")
    from vitcompact.export.deployment import BACKEND_OF
    out = tmp_path / "out"
    torch.manual_seed(0)  # the dense vit-digits the command builds: the same in the next test, exported once
    r = CliRunner().invoke(app, ["bench", "vit-digits", str(compact_dir), *AUTO, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    auto = report["auto"]
    table = {f"{c['runtime']} {c['precision']}": c for c in auto["candidates"]}
    assert set(table) == {"onnxruntime fp32", "onnxruntime int8", "openvino f32", "openvino bf16", "openvino int8"}
    chosen = table[auto["chosen"]]
    assert chosen["status"] == "chosen" and set(chosen["batch_ms"]) == {"1", "4"} and auto["note"] is None
    # The pair is timed on the chosen runtime and precision; the bench's own rows follow.
    runtime, precision = auto["chosen"].split()
    assert report["config"]["backend"] == "auto" and report["environment"]["backend"] == BACKEND_OF[runtime]
    assert report["dense"]["precision"] == report["compact"]["precision"] == precision
    assert [b["batch_size"] for b in report["batches"]] == [1, 4]
    markdown = (out / "bench.md").read_text()
    assert "## Measured choice (backend auto)" in markdown and f"**{auto['chosen']}**" in markdown
    assert markdown.count("| onnxruntime |") == 2 and markdown.count("| openvino |") == 3


def test_cli_bench_auto_without_openvino_chooses_among_onnxruntime_and_says_so(compact_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    torch.manual_seed(0)
    r = CliRunner().invoke(app, ["bench", "vit-digits", str(compact_dir), *AUTO])
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if "OpenVINO" in line]
    assert said == ["backend auto: OpenVINO is not installed; pip install 'vitcompact[openvino]'; choosing among "
                    "onnxruntime fp32, onnxruntime int8 only"]
    assert "backend auto chose onnxruntime " in r.stdout and "| openvino |" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--backend", "auto"], "--backend auto measures each candidate's accuracy, as deploy does: pass --data"),
    (["--backend", "auto", "--data", "digits", "--precision", "int8"], "backend auto chooses the precision"),
    (["--data", "digits"], "--data and --max-accuracy-drop are for --backend auto"),
    (["--backend", "auto", "--data", "digits", "--max-accuracy-drop", "-1"], "max_accuracy_drop must be >= 0"),
])
def test_cli_bench_auto_bad_input_is_one_line(args, message):
    r = CliRunner().invoke(app, ["bench", "vit-digits", "vit-digits", *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_auto_refuses_exported_files_and_needs_data(pair, bundle, tmp_path):
    exported = BenchModel("compact.onnx", (1, 8, 8), None, onnx_path=tmp_path / "compact.onnx")
    with pytest.raises(vc.ConfigError, match="compact.onnx: backend auto exports every candidate from the model"):
        benchmark(pair[0], exported, BenchConfig(backend="auto", **FAST), data=bundle)
    with pytest.raises(vc.ConfigError, match="backend auto measures each candidate's accuracy"):
        benchmark(pair[0], pair[1], BenchConfig(backend="auto", **FAST))
    with pytest.raises(vc.ConfigError, match="data is for backend auto"):
        benchmark(pair[0], pair[1], BenchConfig(backend="torch", **FAST), data=bundle)
