"""TensorRT engine files in the bench: the `<engine>.json` beside each engine, engines published only
after verification, clean refusals without TensorRT or a GPU, and (with both) the real path."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from conftest import file_held, make_family
from test_export import _tensorrt_ready, compact_of
from typer.testing import CliRunner

import vitcompact as vc
import vitcompact.export.tensorrt as trt_mod
from vitcompact.bench import BACKENDS, BackendOptions, BenchConfig, BenchModel, benchmark, resolve
from vitcompact.latency.backends import make_backend, random_batch
from vitcompact.cli.app import app
from vitcompact.export import ExportConfig, ParityError, ParityReport, TensorRTConfig, to_onnx, to_tensorrt
from vitcompact.export.metadata import stamp
from vitcompact.export.tensorrt import EngineInfo, EngineRunner, info_path

FAKE_VERSION = "10.0.0-test"
ENGINE_BYTES = b"serialised engine"
PROFILE = TensorRTConfig(min_batch=1, opt_batch=2, max_batch=4, batch_sizes=(1, 3))
NOT_INSTALLED = ("TensorRT is not installed; on a machine with an NVIDIA GPU run "
                 "pip install 'vitcompact[tensorrt]'")


def tiny_onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A one-node fp32 graph with a dynamic batch axis and images of 3 x 8 x 8."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"], axis=1)], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 192])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(stamp(proto, metadata or {}), str(path))
    return path


STAMPED = {"input_size": "[3, 8, 8]", "macs": "1234", "precision": "fp32"}


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """to_tensorrt with TensorRT mocked: the build returns fixed bytes; returns the verifier's calls."""
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: types.SimpleNamespace(__version__=FAKE_VERSION))
    monkeypatch.setattr(trt_mod, "_build", lambda trt, source, config: ENGINE_BYTES)
    calls: list[dict] = []

    def verify(staged, onnx_path, batch_sizes, atol, *, report_path=None):
        calls.append({"staged": Path(staged), "bytes": Path(staged).read_bytes(), "report_path": report_path,
                      "published": Path(report_path).exists() or info_path(report_path).exists()})
        return ParityReport(Path(report_path or staged), "onnxruntime", atol, {b: 0.0 for b in batch_sizes})
    monkeypatch.setattr(trt_mod, "verify_tensorrt", verify)
    return calls


def write_engine(folder: Path, name: str, info: dict | None = None) -> Path:
    """An engine file (its bytes never run here) with `info` as its `<engine>.json`."""
    engine = folder / name
    engine.write_bytes(ENGINE_BYTES)
    if info is not None:
        info_path(engine).write_text(json.dumps(info))
    return engine


INFO = {"onnx": "model.onnx", "precision": "fp16", "tensorrt": FAKE_VERSION,
        "profile": {"min": 1, "opt": 2, "max": 4}, "input_size": [3, 8, 8], "macs": 1234}


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    return line


# --- the engine's JSON: written with the engine, read by the bench ---------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_and_its_json_are_published_after_verification(tmp_path, fake_tensorrt, precision):
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    engine = tmp_path / "out" / "model.engine"
    result = to_tensorrt(source, engine, replace(PROFILE, precision=precision))
    assert engine.read_bytes() == ENGINE_BYTES
    assert json.loads(info_path(engine).read_text()) == {
        "onnx": "model.onnx", "precision": precision, "tensorrt": FAKE_VERSION,
        "profile": {"min": 1, "opt": 2, "max": 4}, "input_size": [3, 8, 8], "macs": 1234}
    (call,) = fake_tensorrt
    # Verified under a temporary name beside the engine, before anything was in place.
    assert call["staged"].parent == engine.parent and call["staged"] != engine
    assert call["bytes"] == ENGINE_BYTES and call["report_path"] == engine and not call["published"]
    assert result.parity.passed and result.profile == (1, 2, 4)
    assert sorted(p.name for p in engine.parent.iterdir()) == ["model.engine", "model.engine.json"]


def test_unverified_engine_is_published_without_a_check(tmp_path, fake_tensorrt):
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    result = to_tensorrt(source, tmp_path / "model.plan", TensorRTConfig(verify=False))
    assert result.parity is None and not fake_tensorrt
    assert EngineInfo.read(tmp_path / "model.plan").profile == (1, 8, 64)


def test_input_size_comes_from_the_graph_when_metadata_lacks_it(tmp_path, fake_tensorrt):
    source = tiny_onnx(tmp_path / "foreign.onnx")
    to_tensorrt(source, tmp_path / "foreign.engine", PROFILE)
    info = EngineInfo.read(tmp_path / "foreign.engine")
    assert info.input_size == (3, 8, 8) and info.macs is None and info.onnx == "foreign.onnx"


def test_info_round_trips(tmp_path):
    info = EngineInfo.from_dict(INFO, tmp_path / "m.engine.json")
    assert info == EngineInfo((3, 8, 8), 1234, "fp16", (1, 2, 4), "model.onnx", FAKE_VERSION)
    assert info.to_dict() == INFO
    assert EngineInfo.from_dict({**INFO, "macs": None}, tmp_path).macs is None


@pytest.mark.parametrize("change, message", [
    ({"input_size": None}, r"input_size must be \[C, H, W\] in positive integers, not None"),
    ({"input_size": [3, 8]}, "input_size must be"),
    ({"input_size": [3, 0, 8]}, "input_size must be"),
    ({"macs": -1}, "macs must be a non-negative integer or null, not -1"),
    ({"macs": True}, "macs must be"),
    ({"precision": "int8"}, "precision must be one of fp32, fp16, not 'int8'"),
    ({"profile": {"min": 8, "opt": 2, "max": 4}}, r"profile must be \{min, opt, max\} batches"),
    ({"profile": [1, 2, 4]}, "profile must be"),
])
def test_malformed_info_is_refused_in_one_line(tmp_path, change, message):
    engine = write_engine(tmp_path, "m.engine", {**INFO, **change})
    with pytest.raises(vc.ArtifactError, match=message) as info:
        EngineInfo.read(engine)
    assert str(info.value).startswith(f"{info_path(engine)}: ")
    assert str(info.value).endswith("; build the engine again with `vitcompact export tensorrt`")
    assert len(str(info.value).splitlines()) == 1


def test_info_that_is_not_an_object_is_refused(tmp_path):
    engine = write_engine(tmp_path, "m.engine")
    info_path(engine).write_text("[1, 2]")
    with pytest.raises(vc.ArtifactError, match="not a JSON object"):
        EngineInfo.read(engine)


@pytest.mark.parametrize("suffix", [".engine", ".plan"])
def test_bench_resolves_an_engine_from_its_json(tmp_path, suffix):
    engine = write_engine(tmp_path, f"compact{suffix}", INFO)
    model = resolve(str(engine))
    assert (model.input_size, model.macs, model.precision) == ((3, 8, 8), 1234, "fp16")
    assert model.engine_path == engine and model.module is None and model.onnx_path is None
    assert model.to_dict()["engine"] == str(engine)


def test_engine_without_its_json_is_refused(tmp_path):
    engine = write_engine(tmp_path, "model.engine")
    expected = (f"{engine} has no model.engine.json beside it (input size and MACs); build the engine "
                "with `vitcompact export tensorrt`, which writes both")
    with pytest.raises(vc.ArtifactError) as info:
        resolve(str(engine))
    assert str(info.value) == expected
    line = one_line_error(CliRunner().invoke(app, ["bench", str(engine), str(engine)]))
    assert line == f"error: {expected}"


def test_missing_engine_file_is_refused(tmp_path):
    with pytest.raises(vc.ArtifactError, match="does not exist"):
        resolve(str(tmp_path / "nowhere.engine"))


# --- a failed check publishes nothing ----------------------------------------------------------------

def _fail_verification(monkeypatch):
    def verify(staged, onnx_path, batch_sizes, atol, *, report_path=None):
        return ParityReport(Path(report_path), "onnxruntime", atol, {1: 0.0, 3: 0.5})
    monkeypatch.setattr(trt_mod, "verify_tensorrt", verify)


def _fail_build(monkeypatch):
    def build(trt, source, config):
        raise vc.ArtifactError("TensorRT could not build an engine")
    monkeypatch.setattr(trt_mod, "_build", build)


@pytest.mark.parametrize("fail, error", [(_fail_verification, ParityError), (_fail_build, vc.ArtifactError)])
@pytest.mark.parametrize("previous", [False, True])
def test_a_failed_build_or_check_publishes_nothing(tmp_path, fake_tensorrt, monkeypatch, fail, error,
                                                   previous):
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    out = tmp_path / "out"
    out.mkdir()
    engine = write_engine(out, "model.engine", {**INFO, "macs": 1}) if previous else out / "model.engine"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail(monkeypatch)
    with pytest.raises(error) as info:
        to_tensorrt(source, engine, PROFILE)
    if error is ParityError:  # the message names the engine, not its temporary
        assert str(info.value).startswith("model.engine differs from onnxruntime by 0.5 at batch 3")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_engine_path_that_is_a_folder_is_refused_before_building(tmp_path, fake_tensorrt, monkeypatch):
    _fail_build(monkeypatch)  # reaching the build would raise another message
    (tmp_path / "model.engine").mkdir()
    with pytest.raises(vc.ArtifactError, match=r"is a folder; give the path of the \.engine file"):
        to_tensorrt(tiny_onnx(tmp_path / "model.onnx", STAMPED), tmp_path / "model.engine", PROFILE)


# --- one writer per engine, and no engine replaced unless asked ---------------------------------------

def trt_cli(source: Path, engine: Path, *args: str):
    return CliRunner().invoke(app, ["export", "tensorrt", str(source), str(engine), "--min-batch", "1",
                                    "--opt-batch", "2", "--max-batch", "4", "--json", *args])


@pytest.mark.parametrize("existing", ["model.engine", "model.engine.json"])
def test_existing_engine_is_refused_unless_overwrite_before_tensorrt_is_looked_for(tmp_path, monkeypatch, existing):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed, whatever this machine has
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    (tmp_path / existing).write_bytes(b"someone else's file")
    line = one_line_error(trt_cli(source, tmp_path / "model.engine"))
    assert line == (f"error: {tmp_path / existing} already exists; pass --overwrite to replace it, or choose "
                    "another file name")
    line = one_line_error(trt_cli(source, tmp_path / "model.engine", "--overwrite"))
    assert line == f"error: {NOT_INSTALLED}"
    assert (tmp_path / existing).read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", existing])


def test_overwrite_replaces_the_engine_and_its_json(tmp_path, fake_tensorrt):
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    engine = write_engine(tmp_path, "model.engine", {**INFO, "macs": 1})
    engine.write_bytes(b"old engine")
    result = trt_cli(source, engine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert engine.read_bytes() == ENGINE_BYTES and EngineInfo.read(engine).macs == 1234
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json", "model.onnx"]


def test_an_engine_another_export_writes_is_refused(tmp_path, fake_tensorrt):
    source = tiny_onnx(tmp_path / "model.onnx", STAMPED)
    engine = tmp_path / "model.engine"
    with file_held(engine) as holder:
        line = one_line_error(trt_cli(source, engine))
        assert line == (f"error: {engine} is being written by another vitcompact process (PID {holder.pid}); "
                        "wait for it to end or choose another file")
        assert not fake_tensorrt and not engine.exists()


# --- backends: refusals without TensorRT or a GPU, engines only where they can run -------------------

def test_backends_are_registered_and_explained_in_help():
    assert {"tensorrt", "tensorrt-engine"} <= set(BACKENDS.names())
    r = CliRunner().invoke(app, ["bench", "--help"])
    text = " ".join(word for word in r.stdout.split() if word != "│")  # the help is boxed
    assert r.exit_code == 0
    assert "tensorrt is onnxruntime's TensorRT provider" in text
    assert "tensorrt-engine runs .engine/.plan files" in text


@pytest.mark.parametrize("tensorrt_module, cuda, cause", [
    (None, True, NOT_INSTALLED),
    (types.ModuleType("tensorrt"), False, "TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here"),
])
def test_engine_backend_refuses_without_tensorrt_or_gpu(tmp_path, monkeypatch, tensorrt_module, cuda, cause):
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(vc.BackendUnavailableError) as info:
        make_backend("tensorrt-engine", BackendOptions(threads=1))
    assert str(info.value) == f"backend tensorrt-engine: {cause}"
    engine = write_engine(tmp_path, "model.engine", INFO)
    line = one_line_error(CliRunner().invoke(
        app, ["bench", str(engine), str(engine), "--backend", "tensorrt-engine"]))
    assert line == f"error: backend tensorrt-engine: {cause}"


@pytest.mark.parametrize("backend", ["ort-cpu", "torch"])
def test_other_backends_refuse_engine_files(tmp_path, backend):
    engine = write_engine(tmp_path, "model.engine", INFO)
    line = one_line_error(CliRunner().invoke(
        app, ["bench", str(engine), str(engine), "--backend", backend, "--threads", "1"]))
    assert line == (f"error: {engine} is a TensorRT engine file, which backend {backend} cannot run; "
                    "time engine files with --backend tensorrt-engine")


def test_engine_backend_refuses_models_that_are_not_engines(monkeypatch):
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: types.SimpleNamespace(__version__=FAKE_VERSION))
    backend = make_backend("tensorrt-engine", BackendOptions(threads=1))
    with pytest.raises(vc.ConfigError, match=r"m.onnx: backend tensorrt-engine times TensorRT engine files .*"
                                             r"--backend tensorrt \(onnxruntime's TensorRT provider\)"):
        backend.load(BenchModel("m.onnx", (3, 8, 8), None, onnx_path=Path("m.onnx")))


# --- with TensorRT and a GPU: the real path ----------------------------------------------------------

with_tensorrt = pytest.mark.skipif(_tensorrt_ready() is not None, reason=_tensorrt_ready() or "")
GPU_PROFILE = dict(min_batch=1, opt_batch=4, max_batch=8)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A small dense ViT and its compact model as verified FP32 engines, with their ONNX files."""
    root = tmp_path_factory.mktemp("engines")
    dense = make_family("vit_tiny")
    models = {"dense": dense, "compact": compact_of(dense)}
    out = {}
    for name, model in models.items():
        onnx_path = to_onnx(model, root / f"{name}.onnx", ExportConfig(optimize="off")).path
        to_tensorrt(onnx_path, root / f"{name}.engine", TensorRTConfig(**GPU_PROFILE))
        out[name] = (root / f"{name}.engine", Path(onnx_path), model)
    return out


@with_tensorrt
def test_real_engine_json_matches_the_model(engines):
    for engine, _, model in engines.values():
        info = EngineInfo.read(engine)
        assert info.input_size == vc.input_size(model) and info.macs == vc.count(model).macs
        assert info.profile == (1, 4, 8) and info.precision == "fp32"


@with_tensorrt
def test_bench_times_engine_files_natively(engines):
    (dense, _, dense_model), (compact, _, compact_model) = engines["dense"], engines["compact"]
    result = benchmark(str(dense), str(compact), BenchConfig(
        backend="tensorrt-engine", batch_sizes=(1, 4), threads=1, warmup=1, rounds=2, runs_per_round=1,
        min_rounds=1, time_budget_s=None))
    assert [b.batch_size for b in result.batches] == [1, 4]
    assert result.environment["backend"] == "tensorrt-engine"
    ideal = vc.count(dense_model).macs / vc.count(compact_model).macs
    assert result.batches[0].ideal_speedup == pytest.approx(ideal)
    assert all(b.dense.p50 > 0 and b.compact.p50 > 0 for b in result.batches)


@with_tensorrt
def test_engine_backend_runs_what_the_engine_computes(engines):
    engine, _, _ = engines["compact"]
    backend = make_backend("tensorrt-engine", BackendOptions(threads=1, seed=3))
    bind = backend.load(resolve(str(engine)))
    got = bind(4)()
    assert got.is_cuda and got.shape[0] == 4
    want = EngineRunner(engine)(torch.from_numpy(random_batch(4, resolve(str(engine)).input_size, 3)))
    torch.testing.assert_close(got, want)
    with pytest.raises(vc.ConfigError, match=r"was built for batches 1\.\.8, not 16"):
        bind(16)


@with_tensorrt
def test_real_failed_verification_leaves_the_previous_engine(engines, tmp_path):
    engine, onnx_path, _ = engines["dense"]
    target = tmp_path / "dense.engine"
    target.write_bytes(engine.read_bytes())
    info_path(target).write_text(info_path(engine).read_text())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ParityError):  # no FP32 engine matches onnxruntime to 1e-30
        to_tensorrt(onnx_path, target, TensorRTConfig(**GPU_PROFILE, atol=1e-30))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
