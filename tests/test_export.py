"""ONNX export and verification, metadata, FP16/INT8 variants, graph optimisation, TensorRT, CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import input_for, make_family, randomize_, tiny
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.export import (ExportConfig, ParityError, TensorRTConfig, read_metadata, to_fp16, to_int8,
                               to_onnx, to_tensorrt, verify_onnx)
from vitcompact.export import optimize as optimize_mod
from vitcompact.export.verify import ort_session
from vitcompact.models import ConstantBranch
from vitcompact.pruning import PruneMasks

FAMILIES = ("vit_tiny", "deit_distilled", "reg4")
PLAIN = ExportConfig(optimize="off")


def compact_of(model: torch.nn.Module) -> torch.nn.Module:
    masks = vc.regroup(model, vc.magnitude_prune(model, 0.3), vc.RegroupConfig(target="both", head_ratio=0.5, mlp_ratio=0.3))
    return vc.compact(model, masks).eval()


def headless_model() -> torch.nn.Module:
    """vit-digits whose block 0 lost every head (its attention becomes a ConstantBranch)."""
    torch.manual_seed(0)
    model = randomize_(vc.create_model("vit-digits", depth=2))
    masks = PruneMasks.ones(model)
    masks.masks["blocks.0.attn.qkv.weight"][:] = False
    masks.masks["blocks.0.attn.proj.weight"][:] = False
    masks.masks["blocks.1.mlp.fc1.weight"][:5] = False
    masks.masks["blocks.1.mlp.fc2.weight"][:, :5] = False
    small = vc.compact(model, masks).eval()
    assert isinstance(small.blocks[0].attn, ConstantBranch)
    return small


@pytest.fixture(scope="module", params=[(f, kind) for f in FAMILIES for kind in ("dense", "compact")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    family, kind = request.param
    model = make_family(family)
    if kind == "compact":
        model = compact_of(model)
    path = tmp_path_factory.mktemp(f"{family}-{kind}") / "model.onnx"
    return model, to_onnx(model, path, PLAIN)


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """The head-less compact model exported as timm's graph with the graph optimiser forced on (its
    SkipLayerNormalization fusion needs timm's 3-D tensors)."""
    model = headless_model()
    path = tmp_path_factory.mktemp("headless") / "model.onnx"
    return model, to_onnx(model, path, ExportConfig(optimize="on", graph="timm"))


def test_export_verifies_at_batch_1_and_3(exported):
    model, result = exported
    assert result.parity is not None and result.parity.passed
    assert sorted(result.parity.max_abs_diff) == [1, 3]
    assert result.parity.worst <= 1e-4
    assert result.opset == 20 and result.precision == "fp32" and not result.external_data
    # The staging folder is gone: only the shipped file is left.
    assert [p.name for p in result.path.parent.iterdir()] == ["model.onnx"]


def test_batch_axis_is_dynamic_and_io_named(exported):
    model, result = exported
    session = ort_session(result.path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    x = input_for(model, 5)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_metadata_describes_the_model(exported):
    model, result = exported
    meta = read_metadata(result.path)
    counted = vc.count(model)
    record = vc.get_record(model)
    assert meta["structure"] == json.loads(json.dumps(record.structure))
    assert (meta["params"], meta["macs"]) == (counted.params, counted.macs)
    assert meta["source"] == record.source() and meta["source"]["architecture"] == record.architecture


def test_compact_model_with_a_headless_block(headless):
    model, result = headless
    assert result.parity.passed and result.parity.worst <= 1e-4
    meta = read_metadata(result.path)
    assert meta["structure"]["blocks"][0]["heads"] == []
    assert len(meta["structure"]["blocks"][1]["neurons"]) == model.blocks[1].mlp.fc1.out_features == 123


def test_optimize_on_ships_the_fused_graph(headless):
    model, result = headless
    assert result.optimized.applied and bool(result.optimized)
    assert result.optimized.fusions.get("SkipLayerNormalization", 0) > 0
    domains = {n.domain for n in onnx.load(str(result.path)).graph.node}
    assert "com.microsoft" in domains
    assert read_metadata(result.path)["optimization"]["applied"] is True
    # verify_onnx on the shipped (fused) file, independently of the export's own check
    assert verify_onnx(result.path, model).worst <= 1e-4


def test_metadata_round_trip(headless):
    model, result = headless
    meta = read_metadata(result.path)
    record = vc.get_record(model)
    counted = vc.count(model)
    expected = {
        "vitcompact_version": vc.__version__,
        "structure": json.loads(json.dumps(record.structure)),
        "params": counted.params,
        "macs": counted.macs,
        "input_size": [1, 8, 8],
        "mean": [0.5],
        "std": [0.5],
        "num_classes": 10,
        "source": {"architecture": "vit_tiny_patch16_224", "preset": "vit-digits",
                   "model_args": {**vc.PRESETS.get("vit-digits").model_args, "depth": 2}},
        "precision": "fp32",
    }
    assert {k: meta[k] for k in expected} == expected
    assert set(meta) == set(expected) | {"optimization", "graph"} and meta["graph"] == "timm"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_variants_load_and_run(headless, precision):
    model, result = headless
    variant = (to_fp16 if precision == "fp16" else to_int8)(result.path)
    assert variant.path == result.path.with_name(f"model.{precision}.onnx")
    assert read_metadata(variant.path)["precision"] == precision
    session = ort_session(variant.path)
    assert session.get_inputs()[0].type == "tensor(float)"
    x = input_for(model, 3)
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 10) and got.dtype == np.float32
    # Lossy by design, but close: FP16 to ~1e-3, dynamic INT8 to a few 1e-2 on these logits.
    assert 0 < np.abs(got - want).max() < (1e-2 if precision == "fp16" else 0.25)
    ops = {n.op_type for n in onnx.load(str(variant.path)).graph.node}
    inits = {i.data_type for i in onnx.load(str(variant.path)).graph.initializer}
    if precision == "fp16":
        assert onnx.TensorProto.FLOAT16 in inits
    else:
        assert "DynamicQuantizeLinear" in ops and onnx.TensorProto.INT8 in inits
    with pytest.raises(vc.ConfigError, match=f"already {precision}; convert the fp32 export"):
        to_fp16(variant.path)


def test_verify_catches_a_different_model(headless):
    _, result = headless
    other = headless_model()
    with torch.no_grad():
        other.head.bias.add_(1e-3)
    report = verify_onnx(result.path, other)
    assert not report.passed and report.worst == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(ParityError, match=r"differs from PyTorch by 0.001 at batch"):
        report.raise_if_failed()


def test_failed_verification_writes_nothing(tmp_path):
    model = headless_model()
    path = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="tolerance 1e-12"):
        to_onnx(model, path, ExportConfig(optimize="off", atol=1e-12))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(vc.ArtifactError, match=r"cannot create output folder .*file/sub"):
        to_onnx(headless_model(), blocker / "sub" / "model.onnx")
    with pytest.raises(vc.ArtifactError, match="must end in .onnx"):
        to_onnx(headless_model(), tmp_path / "model.bin")


@pytest.mark.parametrize("opset", [13, 16, 99])
def test_unsupported_opset(tmp_path, opset):
    with pytest.raises(vc.ConfigError, match=f"opset {opset} is not supported; use an opset from 17 to 25"):
        to_onnx(headless_model(), tmp_path / "model.onnx", ExportConfig(opset=opset))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("timings, applied", [((10.0, 9.0), True), ((10.0, 9.9), False), ((10.0, 12.0), False)])
def test_auto_keeps_the_fused_graph_only_when_faster(headless, tmp_path, monkeypatch, timings, applied):
    # The plain graph of the shipped file is not kept, so optimise an fp32 export of it again.
    _, result = headless
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.load(str(result.path)), str(plain))
    monkeypatch.setattr(optimize_mod, "time_interleaved", lambda paths, batch: timings)
    report = optimize_mod.optimize(plain, tmp_path / "fused.onnx", "auto", None, 1e-4, (1, 3))
    assert report.applied is applied
    assert report.speedup == pytest.approx(timings[0] / timings[1])
    assert ("kept" in report.reason) and (("plain graph kept" in report.reason) is not applied)


def test_tensorrt_without_the_package_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(vc.BackendUnavailableError, match=r"TensorRT is not installed; .*vitcompact\[tensorrt\]"):
        to_tensorrt(tmp_path / "model.onnx", tmp_path / "model.engine")
    result = CliRunner().invoke(app, ["export", "tensorrt", str(tmp_path / "m.onnx"), str(tmp_path / "m.engine")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: TensorRT is not installed; on a machine with an NVIDIA GPU run pip install 'vitcompact[tensorrt]'"]


def _tensorrt_ready() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'vitcompact[tensorrt]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU available for TensorRT"
    return None


@pytest.mark.skipif(_tensorrt_ready() is not None, reason=_tensorrt_ready() or "")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime(tmp_path, precision):
    model = compact_of(make_family("vit_tiny"))
    result = to_onnx(model, tmp_path / "model.onnx", PLAIN)
    engine = to_tensorrt(result.path, tmp_path / "model.engine",
                         TensorRTConfig(precision=precision, min_batch=1, opt_batch=4, max_batch=8))
    assert engine.parity.passed and sorted(engine.parity.max_abs_diff) == [1, 3]


def test_tensorrt_refuses_the_fused_graph(headless, tmp_path, monkeypatch):
    monkeypatch.setattr("vitcompact.export.tensorrt.require_tensorrt", lambda: object())
    _, result = headless
    with pytest.raises(vc.ConfigError, match="export it again with --optimize off"):
        to_tensorrt(result.path, tmp_path / "model.engine")


def test_cli_exports_an_artifact(tmp_path):
    artifact = vc.save(headless_model(), tmp_path / "compact")
    out = tmp_path / "out" / "model.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", str(artifact), str(out), "--optimize", "off", "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["path"] == str(out) and report["parity"]["passed"] is True
    assert report["optimized"]["reason"] == "optimisation off"
    assert read_metadata(out)["structure"]["blocks"][0]["heads"] == []


def test_cli_rejects_a_bad_opset(tmp_path):
    result = CliRunner().invoke(app, ["export", "onnx", "vit-digits", str(tmp_path / "m.onnx"), "--opset", "12"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: opset 12 is not supported; use an opset from 17 to 25 (default 20)"


def test_export_writes_the_token_matrix_graph_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny().eval()
    randomize_(model)
    forward = model.forward
    path = to_onnx(model, tmp_path / "m.onnx", ExportConfig(optimize="off")).path
    assert "forward" not in vars(model) and model.forward == forward
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    blocks = len(model.blocks)
    # Every linear layer is one Gemm holding its bias (qkv, proj, fc1, fc2 per block, and the head);
    # the two MatMuls per block are attention's q·kᵀ and weights·v, spelt out with its softmax.
    assert ops.count("Gemm") == 4 * blocks + 1 and ops.count("MatMul") == 2 * blocks
    # No bias Add: the Adds are the two residuals per block and the position embedding.
    assert ops.count("Softmax") == blocks and ops.count("Add") == 2 * blocks + 1
    # q, k, v by one split, no Squeeze; the one Shape expands the class token to the batch.
    assert ops.count("Split") == blocks and "Squeeze" not in ops and ops.count("Shape") == 1
    # The weights keep the model's parameter names.
    params = dict(model.named_parameters())
    gemm_weights = [n.input[1] for n in graph.node if n.op_type == "Gemm"]
    assert set(gemm_weights) <= set(params) and len(set(gemm_weights)) == 4 * blocks + 1
    assert read_metadata(path)["graph"] == "token-matrix"


def test_timm_graph_spells_attention_out_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny().eval()
    flags = [b.attn.fused_attn for b in model.blocks]
    path = to_onnx(model, tmp_path / "m.onnx", ExportConfig(optimize="off", graph="timm")).path
    assert [b.attn.fused_attn for b in model.blocks] == flags and "forward" not in vars(model)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # Explicit softmax(q·kᵀ)·v per block, without the shape arithmetic of the fused kernel's
    # spelling: the one Shape left expands the class token to the batch. Linear layers are
    # MatMul + Add on timm's 3-D tensors; only the head (2-D) is a Gemm.
    assert ops.count("Softmax") == len(model.blocks) and ops.count("Shape") == 1
    assert ops.count("Gemm") == 1 and ops.count("MatMul") == 6 * len(model.blocks)


def test_token_matrix_graph_of_a_headless_block(tmp_path):
    model = headless_model()
    result = to_onnx(model, tmp_path / "m.onnx", ExportConfig(optimize="off"))
    assert result.parity.passed and result.parity.worst <= 1e-4
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    # Block 0 has no attention left (a constant branch): qkv, proj and one softmax are gone.
    assert (ops.count("Gemm"), ops.count("Softmax")) == (2 + 4 + 1, 1)


def test_export_rejects_an_unknown_graph(tmp_path):
    result = CliRunner().invoke(app, ["export", "onnx", "vit-digits", str(tmp_path / "m.onnx"), "--graph", "nhwc"])
    assert result.exit_code == 2 and not (tmp_path / "m.onnx").exists()
    assert result.output.strip() == "error: unknown graph 'nhwc'; choose one of: token-matrix, timm"
