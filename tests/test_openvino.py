"""OpenVINO IR export (parity, metadata, the bf16 / INT8 checks), the `openvino` latency backend, the
measured choice of runtime and precision, and the CPU's instruction sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitcompact as vc
from vitcompact.cpu_features import cpu_features
from vitcompact.errors import BackendUnavailableError, ConfigError
from vitcompact.export import ExportConfig, read_metadata, to_onnx
from vitcompact.export.choice import Candidate, choose
from vitcompact.export.int8 import AccuracyDropError
from vitcompact.export.openvino import OpenVINOConfig, read_ir_metadata, require_openvino, to_openvino
from vitcompact.export.openvino_checks import Images, Reference, check_reduced
from vitcompact.export.verify import ParityError

from conftest import file_held, one_line_error

GRAPHS = ("token-matrix", "timm")
# Random weights give near-tied logits, whose top-1 a reduced precision may flip on another CPU; the
# checks that must pass here are loosened, those that must fail are made impossible.
LOOSE = dict(min_top1_agreement=0.5, max_accuracy_drop=50.0)


def dense_model() -> torch.nn.Module:
    """vit-digits cut to two blocks: each export traces every block, so fewer blocks export faster."""
    torch.manual_seed(0)
    return vc.create_model("vit-digits", num_classes=10, depth=2).eval()


def compact_model() -> torch.nn.Module:
    model = dense_model()
    masks = vc.regroup(model, vc.magnitude_prune(model, rate=0.5),
                       vc.RegroupConfig(target="both", head_ratio=0.5, mlp_ratio=0.5))
    return vc.compact(model, masks).eval()


MODELS = {"dense": dense_model, "compact": compact_model}


@pytest.fixture
def openvino():
    return pytest.importorskip("openvino", reason="OpenVINO is an optional extra (vitcompact[openvino])")


@pytest.fixture(scope="module")
def digits():
    return vc.load_data("digits", batch_size=32, limit=160, aug="none")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """The dense model's FP32 ONNX file, exported once."""
    return to_onnx(dense_model(), tmp_path_factory.mktemp("onnx") / "dense.onnx", ExportConfig(optimize="off")).path


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# The measured choice: stubs stand in for runtimes, so these run without OpenVINO.

def stub_choice(latency: dict[str, float], accuracy: dict[str, float], guard: float | None = 1.0):
    candidates = [Candidate(*label.split()) for label in latency]
    timed: list[str] = []

    def time_fn(c: Candidate) -> float:
        timed.append(c.label)
        return latency[c.label]
    return choose(candidates, time_fn, lambda c: accuracy[c.label], guard), timed


def test_choice_picks_the_faster_backend_and_retimes_interleaved():
    choice, timed = stub_choice({"onnxruntime fp32": 10.0, "openvino bf16": 4.0},
                                {"onnxruntime fp32": 0.90, "openvino bf16": 0.899})
    assert choice.chosen.candidate.label == "openvino bf16"
    assert [m.status for m in choice.table] == ["chosen", "slower"]
    # one ranking timing each, then rounds (fastest first) that alternate who goes first
    assert timed[:2] == ["onnxruntime fp32", "openvino bf16"]
    assert timed[2:6] == ["openvino bf16", "onnxruntime fp32", "onnxruntime fp32", "openvino bf16"]
    assert choice.speedup_over("onnxruntime fp32") == pytest.approx(2.5)
    assert "| openvino | bf16 |" in choice.to_markdown()


def test_choice_refuses_a_faster_backend_over_the_accuracy_guard():
    choice, _ = stub_choice({"onnxruntime fp32": 10.0, "openvino int8": 2.0},
                            {"onnxruntime fp32": 0.90, "openvino int8": 0.85})
    assert choice.chosen.candidate.label == "onnxruntime fp32"
    refused = next(m for m in choice.table if m.candidate.label == "openvino int8")
    assert refused.status == "over the accuracy guard" and refused.drop_points == pytest.approx(5.0)
    assert choice.to_dict()["candidates"][0]["runtime"] == "openvino"  # fastest first, chosen or not


def test_choice_without_any_candidate_within_the_guard_is_refused():
    with pytest.raises(AccuracyDropError, match="every candidate loses more than 1 points"):
        choose([Candidate("a", "int8")], lambda c: 1.0, lambda c: 0.5, 1.0, reference_accuracy=0.9)


def test_choice_skips_a_runtime_this_machine_lacks():
    def time_fn(c: Candidate) -> float:
        if c.runtime == "tensorrt":
            raise BackendUnavailableError("TensorRT needs an NVIDIA GPU")
        return 3.0
    choice = choose([Candidate("onnxruntime", "fp32"), Candidate("tensorrt", "fp16")], time_fn, lambda c: 0.9)
    assert choice.chosen.candidate.runtime == "onnxruntime"
    assert choice.table[-1].status == "unavailable" and "NVIDIA" in choice.table[-1].reason


def test_reduced_precision_accuracy_guard_can_fail():
    """A run that flips the top-1 class of a quarter of the images passes a loose logits tolerance and
    agreement threshold, and is refused by the accuracy guard."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 16)
    want = np.eye(10, dtype=np.float32)[labels] * 5.0
    got = want.copy()
    got[:4] = np.roll(got[:4], 1, axis=1)
    images = Images([np.arange(16, dtype=np.float32)], [labels])
    ref = Reference("reference", lambda x: want[x.astype(int)], [1, 1, 1])
    config = OpenVINOConfig(precision="bf16", logits_rtol=2.0, min_top1_agreement=0.5)
    with pytest.raises(AccuracyDropError, match="loses 25.00 points"):
        check_reduced(Path("model.xml"), lambda x: got[x.astype(int)], ref, images, config)
    report, accuracy = check_reduced(Path("model.xml"), lambda x: got[x.astype(int)], ref, images,
                                      OpenVINOConfig(precision="bf16", logits_rtol=2.0, min_top1_agreement=0.5,
                                                     max_accuracy_drop=30.0))
    assert accuracy["drop_points"] == pytest.approx(25.0) and report.top1_agreement[16] == 0.75


@pytest.mark.parametrize("kwargs", [dict(precision="fp16"), dict(int8_source="onnx"), dict(atol=0.0),
                                    dict(max_accuracy_drop=-1.0), dict(min_top1_agreement=1.5),
                                    dict(calibration_images=0), dict(threads=0)])
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ConfigError):
        OpenVINOConfig(**kwargs)


def test_cpu_features_read_flags_and_model():
    cpuinfo = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
               "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8\n")
    features = cpu_features(cpuinfo)
    assert features.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert features.amx and features.native_bf16 and features.native_int8 and features.best_isa == "AMX"
    plain = cpu_features("model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert not plain.amx and not plain.native_bf16 and plain.best_isa == "AVX2"
    here = cpu_features().to_dict()
    assert {"model", "amx", "avx512_vnni", "avx512_bf16", "avx2", "torch_capability"} <= set(here)


# Without OpenVINO: one clean line, whatever the entry point.

def test_without_openvino_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    expected = "OpenVINO is not installed; pip install 'vitcompact[openvino]'"
    for call in (require_openvino, lambda: to_openvino(dense_model(), tmp_path / "m.xml")):
        with pytest.raises(BackendUnavailableError) as info:
            call()
        assert str(info.value) == expected
    from vitcompact.export.openvino_backend import OpenVINOBackend, OpenVINOOptions
    with pytest.raises(BackendUnavailableError) as info:
        OpenVINOBackend(OpenVINOOptions(threads=1))
    assert str(info.value) == f"backend openvino: {expected}"
    assert list(tmp_path.iterdir()) == []


# With OpenVINO.

@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("kind", MODELS)
def test_ir_export_parity_and_metadata(openvino, tmp_path, kind, graph):
    model = MODELS[kind]()
    out = tmp_path / "model.xml"
    result = to_openvino(model, out, export_config=ExportConfig(graph=graph))
    assert out.is_file() and out.with_suffix(".bin").is_file() and leftovers(tmp_path) == []
    assert result.parity.passed and result.parity.reference == "PyTorch" and result.parity.worst <= 1e-4
    assert result.executed_precision == "f32"
    ir = openvino.Core().read_model(str(out))
    stored = {k: v.astype(str) for k, v in ir.get_rt_info()["vitcompact"].items()}
    assert stored["graph"] == graph and stored["precision"] == "fp32"
    assert stored["params"] == str(vc.count(model).params)
    assert (stored["structure"] != "null") == (kind == "compact")
    assert ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"
    assert read_ir_metadata(out) == stored


def test_ir_from_an_onnx_file_keeps_its_metadata(openvino, tmp_path, onnx_file):
    result = to_openvino(onnx_file, tmp_path / "from-onnx.xml")
    assert result.parity.passed and "onnxruntime" in result.parity.reference
    stored = read_ir_metadata(result.path)
    onnx_meta = read_metadata(onnx_file)
    assert stored["macs"] == str(onnx_meta["macs"]) and stored["vitcompact_version"] == onnx_meta["vitcompact_version"]


def test_bf16_is_recorded_checked_and_refused_beyond_its_tolerance(openvino, tmp_path, onnx_file, digits):
    out = tmp_path / "model.xml"
    result = to_openvino(onnx_file, out, OpenVINOConfig(precision="bf16", **LOOSE), validation=digits.val)
    assert result.inference_precision == "bf16" and result.accuracy["images"] == len(digits.val.dataset)
    assert 0 < result.parity.worst <= result.parity.atol and result.parity.top1_agreement
    ir = openvino.Core().read_model(str(out))
    assert ir.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "bf16"
    before = out.read_bytes(), out.with_suffix(".bin").read_bytes()
    with pytest.raises(ParityError, match="^OpenVINO bf16 logits differ") as info:
        to_openvino(onnx_file, out, OpenVINOConfig(precision="bf16", logits_rtol=1e-9), validation=digits.val)
    assert len(str(info.value).splitlines()) == 1
    # the refused export left the earlier files as they were, and no staging folder
    assert (out.read_bytes(), out.with_suffix(".bin").read_bytes()) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("source", ["nncf", "qdq"])
def test_int8_passes_its_checks_and_is_refused_beyond_them(openvino, tmp_path, onnx_file, digits, source, capsys):
    out = tmp_path / f"{source}.xml"
    result = to_openvino(onnx_file, out, OpenVINOConfig(precision="int8", int8_source=source, calibration_images=64,
                                                        **LOOSE), calibration=digits)
    assert result.int8_source == source and result.accuracy["images"] == len(digits.val.dataset)
    assert read_ir_metadata(out)["precision"] == "int8"
    assert capsys.readouterr().out == ""  # quantisers' progress output would corrupt --json
    with pytest.raises(ParityError, match="^OpenVINO int8 logits differ"):
        to_openvino(onnx_file, tmp_path / "refused.xml",
                    OpenVINOConfig(precision="int8", int8_source=source, calibration_images=64, logits_rtol=1e-9),
                    calibration=digits)
    assert not (tmp_path / "refused.xml").exists() and leftovers(tmp_path) == []


def test_int8_auto_times_both_sources_and_records_them(openvino, tmp_path, onnx_file, digits):
    result = to_openvino(onnx_file, tmp_path / "auto.xml",
                         OpenVINOConfig(precision="int8", calibration_images=64, choice_batch=2, **LOOSE),
                         calibration=digits)
    table = result.int8_choice.to_dict()["candidates"]
    assert {c["precision"] for c in table} == {"int8 (nncf)", "int8 (qdq)"}
    assert result.int8_source in ("nncf", "qdq") and result.int8_choice.chosen.retimed_ms


def test_int8_needs_calibration_images(openvino, tmp_path, onnx_file):
    with pytest.raises(ConfigError, match="needs calibration images"):
        to_openvino(onnx_file, tmp_path / "m.xml", OpenVINOConfig(precision="int8"))
    with pytest.raises(ConfigError, match="takes a DataBundle"):
        to_openvino(onnx_file, tmp_path / "m.xml", OpenVINOConfig(precision="int8", int8_source="qdq"),
                    calibration=[torch.randn(4, 1, 8, 8)])


@pytest.fixture(scope="module")
def bench_model():
    """The compact model to time; it exports itself to ONNX once, for every backend test."""
    from vitcompact.latency.sources import BenchModel
    return BenchModel.of(compact_model())


@pytest.mark.parametrize("precision", ["f32", "bf16", "int8"])
def test_backend_runs_a_batch_and_reports_its_settings(openvino, bench_model, precision):
    from vitcompact.export.openvino_backend import OpenVINOBackend, OpenVINOOptions
    from vitcompact.latency.backends import BACKENDS, BackendOptions
    from vitcompact.latency.environment import environment

    assert isinstance(BACKENDS.get("openvino")(BackendOptions(threads=1)), OpenVINOBackend)
    backend = OpenVINOBackend(OpenVINOOptions(threads=1, precision=precision))
    run = backend.load(bench_model)(3)
    run()
    settings = backend.settings()
    assert settings["threads"] == 1 and settings["streams"] == 1 and settings["performance_hint"] == "LATENCY"
    assert settings["precision"] == precision and settings["inference_precision"] in ("f32", "bf16")
    assert (settings["int8_from"] is not None) == (precision == "int8")
    assert environment(settings)["cpu_features"]["model"]


# The commands: export openvino, bench --backend openvino, deploy.

def cli(*args: str):
    from typer.testing import CliRunner
    from vitcompact.cli.app import app
    return CliRunner().invoke(app, list(args))


def test_commands_have_examples():
    for args in (["export", "openvino"], ["deploy"]):
        assert "Example:" in cli(*args, "--help").output, args


def test_cli_export_openvino_writes_a_checked_ir(openvino, tmp_path, digits_two_blocks):
    out = tmp_path / "digits.xml"
    result = cli("export", "openvino", digits_two_blocks, str(out), "--precision", "bf16", "--calib-data", "digits",
                 "--max-accuracy-drop", "50", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["precision"] == "bf16" and report["accuracy"]["images"] > 0 and report["parity"]["passed"]
    assert out.is_file() and out.with_suffix(".bin").is_file() and leftovers(tmp_path) == []
    assert read_ir_metadata(out)["precision"] == "bf16"


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "--precision int8 needs --calib-data"),
    (["--precision", "fp16"], "OpenVINO precision"),
])
def test_cli_export_openvino_bad_input_is_one_line(tmp_path, args, message):
    one_line_error(cli("export", "openvino", "vit-digits", str(tmp_path / "m.xml"), *args), message)


@pytest.mark.parametrize("existing", ["m.xml", "m.bin"])
def test_cli_export_openvino_refuses_an_existing_ir_unless_overwrite(tmp_path, existing):
    """Refused before OpenVINO is looked for, so the same on every machine; nothing is touched."""
    (tmp_path / existing).write_bytes(b"someone else's file")
    one_line_error(cli("export", "openvino", "vit-digits", str(tmp_path / "m.xml")),
                   f"{tmp_path / existing} already exists; pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {existing: b"someone else's file"}


def test_cli_export_openvino_overwrite_replaces_the_ir(openvino, tmp_path, digits_two_blocks):
    out = tmp_path / "m.xml"
    out.write_bytes(b"old")
    out.with_suffix(".bin").write_bytes(b"old weights")
    result = cli("export", "openvino", digits_two_blocks, str(out), "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert read_ir_metadata(out)["precision"] == "fp32" and out.with_suffix(".bin").read_bytes() != b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]


def test_cli_export_openvino_refuses_a_file_another_export_writes(tmp_path):
    out = tmp_path / "m.xml"
    with file_held(out) as holder:
        one_line_error(cli("export", "openvino", "vit-digits", str(out), "--overwrite"),
                       f"{out} is being written by another vitcompact process (PID {holder.pid})")
        assert [p.name for p in tmp_path.iterdir()] == [".m.xml.lock"]  # the holder's, nothing else


def test_cli_bench_openvino_records_its_settings_and_the_cpu(openvino, onnx_file):
    # The exported file on both sides: bench times ONNX files as they are, no export of its own.
    result = cli("bench", str(onnx_file), str(onnx_file), "--backend", "openvino", "--precision", "bf16",
                 "--batch-sizes", "2", "--threads", "1", "--rounds", "2", "--time-budget", "0.01", "--json")
    assert result.exit_code == 0, result.output
    env = json.loads(result.output)["environment"]
    assert (env["backend"], env["precision"], env["threads"], env["streams"]) == ("openvino", "bf16", 1, 1)
    assert env["performance_hint"] == "LATENCY" and env["inference_precision"] in ("bf16", "f32")
    assert {"amx", "avx512_vnni", "avx512_bf16", "avx2", "best_isa"} <= set(env["cpu_features"])


def test_cli_bench_precision_is_for_openvino_only():
    one_line_error(cli("bench", "vit-digits", "vit-digits", "--precision", "int8"), "backend openvino only")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, digits_two_blocks):
    """`vitcompact deploy` on the two-block vit-digits, every candidate, a tiny time budget."""
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("deploy") / "out"
    result = cli("deploy", digits_two_blocks, str(out), "--data", "digits", "--batch-sizes", "1,4", "--threads", "1",
                 "--time-budget", "0.01", "--max-accuracy-drop", "50", "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_deploy_writes_the_chosen_artifact_and_the_table(deployed):
    out, report = deployed
    table = {f"{c['runtime']} {c['precision']}": c for c in report["candidates"]}
    assert set(table) == {"onnxruntime fp32", "onnxruntime int8", "openvino f32", "openvino bf16", "openvino int8"}
    # random weights give near-tied logits: a reduced precision's own agreement check may refuse it elsewhere
    assert all(c["status"] in ("chosen", "slower", "refused") for c in table.values()), table
    assert table["onnxruntime fp32"]["status"] in ("chosen", "slower")
    chosen = table[report["chosen"]]
    assert chosen["status"] == "chosen" and set(chosen["batch_ms"]) == {"1", "4"}
    # the chosen one is the fastest of those re-timed (by the median of its re-timings)
    assert chosen["latency_ms"] == min(c["latency_ms"] for c in table.values() if c["retimed_ms"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*report["files"], "deploy.json", "deploy.md"])
    markdown = (out / "deploy.md").read_text()
    assert f"**{report['chosen']}**" in markdown and report["environment"]["cpu"] in markdown
    assert markdown.count("| onnxruntime |") == 2 and markdown.count("| openvino |") == 3
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_deploy_refuses_a_candidate_over_the_guard(tmp_path, digits, monkeypatch):
    """A candidate whose accuracy is over the guard stays in the table and is not chosen, however fast."""
    from vitcompact.export import DeployConfig, deploy
    from vitcompact.export.deployment import Candidates

    real = Candidates.accuracy

    def accuracy(self, c):
        top1 = real(self, c)
        return top1 - 0.2 if c.label == "onnxruntime int8" else top1
    monkeypatch.setattr(Candidates, "accuracy", accuracy)
    monkeypatch.setattr(Candidates, "time", lambda self, c: 1.0 if c.label == "onnxruntime int8" else 5.0)
    result = deploy(dense_model(), tmp_path / "out", DeployConfig(candidates=("onnxruntime fp32", "onnxruntime int8"),
                                                                  time_budget_s=0.01), digits)
    assert result.chosen == "onnxruntime fp32" and [p.name for p in result.files] == ["model.onnx"]
    refused = next(m for m in result.choice.table if m.candidate.label == "onnxruntime int8")
    assert refused.status == "over the accuracy guard"


@pytest.mark.parametrize("kwargs", [dict(batch_sizes=()), dict(candidates=("tensorrt fp16",)),
                                    dict(candidates=("openvino f32", "openvino f32")), dict(time_budget_s=0.0),
                                    dict(max_accuracy_drop=-1.0), dict(int8_source="onnx")])
def test_deploy_config_refuses_bad_values(kwargs):
    from vitcompact.export import DeployConfig
    with pytest.raises(ConfigError):
        DeployConfig(**kwargs)


def test_without_openvino_commands_say_so_in_one_line(monkeypatch, tmp_path, digits):
    monkeypatch.setitem(sys.modules, "openvino", None)
    expected = "OpenVINO is not installed; pip install 'vitcompact[openvino]'"
    one_line_error(cli("export", "openvino", "vit-digits", str(tmp_path / "m.xml")), expected)
    one_line_error(cli("bench", "vit-digits", "vit-digits", "--backend", "openvino", "--batch-sizes", "1"), expected)
    assert list(tmp_path.iterdir()) == []
    # deploy goes on with the runtimes this machine has, and says why OpenVINO is not among them
    from vitcompact.export import DeployConfig, deploy
    result = deploy(dense_model(), tmp_path / "out", DeployConfig(candidates=("onnxruntime fp32", "openvino bf16"),
                                                                  time_budget_s=0.01), digits)
    assert result.chosen == "onnxruntime fp32"
    missing = result.choice.table[-1]
    assert missing.status == "unavailable" and missing.reason == expected
