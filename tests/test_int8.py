"""INT8 files: static calibration on the training split only, measured accuracy, the accuracy guard."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import vitcompact as vc
from vitcompact.cli.app import app
from vitcompact.export import (AccuracyDropError, ExportConfig, Int8Config, read_metadata, to_int8,
                               to_onnx)
from vitcompact.export.int8 import end_layers
from vitcompact.export.verify import loader_top1, onnx_runner, ort_session
from vitcompact.errors import ConfigError

from conftest import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    """Digits at the demo model's input, unaugmented: 1,437 training, 180 validation, 180 test... images."""
    return vc.load_data("digits", batch_size=64, aug="none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A two-block vit-digits trained to a useful accuracy, saved, and its fp32 ONNX file."""
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = vc.create_model("vit-digits", depth=2)
    # 14 epochs: 87 % test top-1 (20 gave 91 %), well above the 80 % the first test needs.
    vc.train(model, vc.load_data("digits", batch_size=64), vc.TrainConfig(epochs=14, lr=3e-3, progress=False))
    model.eval()
    vc.save(model, root / "model")
    onnx_path = to_onnx(model, root / "model.onnx", ExportConfig(optimize="off")).path
    return root, model, onnx_path


# Static INT8 of the trained model from 2 calibration batches, unguarded: the reference the other
# settings (FP32 ends, scope, calibration images and method) are compared with.
QUICK = Int8Config(mode="static", calib_batches=2, max_accuracy_drop=None)


@pytest.fixture(scope="module")
def quick_int8(trained, digits):
    root, _, src = trained
    return to_int8(src, root / "quick.int8.onnx", QUICK, data=digits)


def silenced(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with MLP neuron 0 of every block cut off from fc2 (its weights column zeroed)."""
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc2.weight[:, 0] = 0.0
    return model.eval()


def with_outlier(model: torch.nn.Module) -> torch.nn.Module:
    """A silenced model whose silent neuron outputs ~1000 (a huge fc1 bias): the same FP32 function,
    but fc2's input range is now set by the outlier, and per-tensor INT8 loses everything else."""
    model = silenced(model)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.bias[0] = 1000.0
    return model


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_static_int8_keeps_top1_and_records_what_it_measured(trained, digits, tmp_path):
    _, _, src = trained
    result = to_int8(src, tmp_path / "m.int8.onnx", Int8Config(mode="static"), data=digits)
    meta = read_metadata(result.path)
    assert meta["precision"] == "int8" and result.precision == "int8"
    # Verified on validation images (what it was calibrated for), within the variants' tolerance.
    assert result.parity.reference == "model.onnx on validation images" and result.parity.passed
    record = meta["int8"]
    assert record == result.int8
    assert {k: record[k] for k in ("mode", "calibration", "calib_batches", "per_channel", "scope",
                                   "calibration_split", "max_accuracy_drop")} == {
        "mode": "static", "calibration": "minmax", "calib_batches": 16, "per_channel": True,
        "scope": "linear", "calibration_split": "train", "max_accuracy_drop": 1.0}
    # 16 batches of 64 asked for; the training split holds more.
    assert record["calibration_images"] == 16 * 64 < len(digits.train.dataset)
    fp32, int8 = onnx_runner(ort_session(src)), onnx_runner(ort_session(result.path))
    for split, loader in (("val", digits.val), ("test", digits.test)):
        measured = record["accuracy"][split]
        assert measured["images"] == len(loader.dataset)
        assert measured["fp32"] == loader_top1(fp32, loader)
        assert measured["int8"] == loader_top1(int8, loader)
        assert measured["drop_points"] == pytest.approx((measured["fp32"] - measured["int8"]) * 100, abs=1e-4)
    assert record["accuracy"]["test"]["fp32"] > 0.8  # a trained model, so the check below means something
    assert abs(record["accuracy"]["test"]["drop_points"]) <= 2.0
    # QDQ with int8 weights, per channel: the weight layers' scales are vectors.
    graph = onnx.load(str(result.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in graph.initializer)
    # Scope "linear": softmax and LayerNorm read float tensors, never a DequantizeLinear output.
    producers = {out: n.op_type for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input), node.name
    # ... and so do attention's two activation products: of the 2 blocks' 4 weight matmuls and
    # 2 activation matmuls each, only the weight ones (and the head) read dequantised inputs.
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    dequantised = [n for n in matmuls if all(producers.get(i) == "DequantizeLinear" for i in n.input[:2])]
    plain = [n for n in matmuls if not any(producers.get(i) == "DequantizeLinear" for i in n.input[:2])]
    assert (len(dequantised), len(plain)) == (4 * 2 + 1, 2 * 2)


def test_fp32_ends_keeps_the_head_in_float_and_only_scope_all_quantises_the_patch_embedding(trained, digits, tmp_path,
                                                                                          quick_int8):
    _, model, src = trained
    names = end_layers(src)
    graph = onnx.load(str(src)).graph
    by_name = {n.name: n for n in graph.node}
    assert [by_name[n].op_type for n in names][0] == "Conv" and len(names) == 2
    # The head: its weight initializer is the classifier's (10 outputs of 64 inputs).
    inits = initializers(src)
    head_shapes = [inits[i].shape for i in by_name[names[1]].input if i in inits]
    assert (64, 10) in head_shapes or (10, 64) in head_shapes
    config = QUICK
    full = quick_int8
    ends = to_int8(src, tmp_path / "ends.onnx", dataclasses.replace(config, fp32_ends=True), data=digits)
    assert ends.int8["fp32_ends"] is True and full.int8["fp32_ends"] is False

    def int8_weights(path):
        return sorted(tuple(a.shape) for a in initializers(path).values() if a.dtype == np.int8 and a.ndim >= 2)
    # Per block: qkv, proj, fc1, fc2; plus the head unless the ends stay FP32. Scope "linear" never
    # quantises the patch embedding (onnxruntime would run it as dequantise + FP32 Conv); "all" does.
    assert len(int8_weights(full.path)) == 4 * len(model.blocks) + 1
    assert len(int8_weights(ends.path)) == 4 * len(model.blocks)
    assert (64, 1, 2, 2) not in int8_weights(full.path)
    everything = to_int8(src, tmp_path / "all.onnx", dataclasses.replace(config, scope="all"), data=digits)
    assert (64, 1, 2, 2) in int8_weights(everything.path)
    assert (10, 64) not in int8_weights(ends.path) and (64, 10) not in int8_weights(ends.path)


def test_calibration_never_reads_the_test_split(trained, digits, tmp_path, quick_int8):
    _, _, src = trained
    blank = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(7, 1, 8, 8), torch.zeros(7, dtype=torch.long)), batch_size=7)
    other = dataclasses.replace(digits, test=blank)
    config = QUICK
    a = quick_int8  # calibrated on `digits`, whose test split `other` replaces
    b = to_int8(src, tmp_path / "b.onnx", config, data=other)
    assert b.int8["accuracy"]["test"]["images"] == 7  # the other test split was used, for accuracy only
    ia, ib = initializers(a.path), initializers(b.path)
    assert ia.keys() == ib.keys() and any(k.endswith("_scale") for k in ia)
    for name in ia:
        assert np.array_equal(ia[name], ib[name]), name
    # ... while other calibration images do change the scales.
    shifted = dataclasses.replace(digits, train=digits.val)
    c = to_int8(src, tmp_path / "c.onnx", config, data=shifted)
    ic = initializers(c.path)
    assert any(not np.array_equal(ia[k], ic[k]) for k in ia if k.endswith("_scale"))


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods_are_recorded(trained, digits, tmp_path, method, quick_int8):
    _, _, src = trained
    result = to_int8(src, tmp_path / "m.onnx", Int8Config(mode="static", calibration=method, calib_batches=2,
                                                         max_accuracy_drop=None), data=digits)
    assert result.int8["calibration"] == method
    assert result.int8["calibration_images"] == 128
    minmax = quick_int8  # the same settings, calibrated by minmax
    assert minmax.int8["calibration"] == "minmax" and minmax.int8["calibration_images"] == 128
    scales = [k for k in initializers(minmax.path) if k.endswith("_scale")]
    assert any(not np.array_equal(initializers(minmax.path)[k], initializers(result.path)[k]) for k in scales)


def test_dynamic_int8_with_data_is_measured_and_without_is_not(trained, digits, tmp_path):
    _, _, src = trained
    measured = to_int8(src, tmp_path / "d.onnx", data=digits)
    assert measured.int8["mode"] == "dynamic" and "calibration" not in measured.int8
    assert measured.int8["accuracy"]["test"]["int8"] == loader_top1(onnx_runner(ort_session(measured.path)),
                                                                    digits.test)
    plain = to_int8(src, tmp_path / "p.onnx")
    assert plain.int8 == {"mode": "dynamic", "per_channel": True, "max_accuracy_drop": 1.0}
    with pytest.raises(ConfigError, match="static INT8 needs calibration images"):
        to_int8(src, tmp_path / "s.onnx", Int8Config(mode="static"))


def test_accuracy_guard_refuses_and_writes_nothing(trained, digits, tmp_path):
    reference = silenced(vc.load(trained[0] / "model"))
    outlier = with_outlier(vc.load(trained[0] / "model"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(outlier(x), reference(x), atol=1e-4)  # the same function in FP32
    src = to_onnx(outlier, tmp_path / "o.onnx", ExportConfig(optimize="off")).path
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AccuracyDropError) as e:
        to_int8(src, tmp_path / "o.int8.onnx", Int8Config(mode="static"), data=digits)
    assert "static INT8 loses" in str(e.value) and "more than the allowed 1;" in str(e.value)
    assert "o.int8.onnx not written" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Unguarded, the file is written and its metadata shows the loss the guard saw.
    kept = to_int8(src, tmp_path / "o.int8.onnx", Int8Config(mode="static", max_accuracy_drop=None), data=digits)
    assert kept.int8["accuracy"]["val"]["drop_points"] > 1.0


def test_int8_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="unknown int8 mode 'fast'"):
        Int8Config(mode="fast")
    with pytest.raises(ConfigError, match="unknown calibration method 'kl'"):
        Int8Config(calibration="kl")
    with pytest.raises(ConfigError, match="unknown int8 scope"):
        Int8Config(scope="some")
    with pytest.raises(ConfigError, match="calib_batches"):
        Int8Config(calib_batches=0)
    with pytest.raises(ConfigError, match="max_accuracy_drop must be >= 0"):
        Int8Config(max_accuracy_drop=-1.0)


def test_cli_static_int8_and_its_guard(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / "m.onnx"
    ok = runner.invoke(app, ["export", "onnx", str(root / "model"), str(out), "--int8", "static",
                             "--calib-data", "digits", "--calib-batches", "4", "--json"])
    assert ok.exit_code == 0, ok.output
    results = json.loads(ok.output)
    assert [r["precision"] for r in results] == ["fp32", "int8"]
    assert results[1]["path"] == str(tmp_path / "m.int8.onnx")
    assert results[1]["int8"]["calibration_images"] == 256
    assert read_metadata(tmp_path / "m.int8.onnx")["int8"] == results[1]["int8"]

    outlier = tmp_path / "outlier"
    vc.save(with_outlier(vc.load(root / "model")), outlier)
    target = tmp_path / "o" / "m.onnx"
    refused = runner.invoke(app, ["export", "onnx", str(outlier), str(target), "--int8", "static",
                                  "--calib-data", "digits"])
    one_line_error(refused, "static INT8 loses")
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # not even the fp32 file


@pytest.mark.parametrize("args, expected", [
    (["--int8", "static"], "--int8 static needs --calib-data SOURCE"),
    (["--calib-data", "digits"], "--calib-data is for INT8; add --int8 static"),
    (["--int8", "fast"], "unknown int8 mode 'fast'; choose one of: dynamic, static"),
    (["--int8", "static", "--calib-data", "digits", "--calib-method", "kl"], "unknown calibration method 'kl'"),
    (["--int8", "dynamic", "--max-accuracy-drop", "-1"], "max_accuracy_drop must be >= 0"),
    (["--int8", "static", "--calib-data", "nosuch"], "nosuch"),
])
def test_cli_int8_usage_errors(trained, tmp_path, args, expected):
    root, _, _ = trained
    out = tmp_path / "m.onnx"
    one_line_error(runner.invoke(app, ["export", "onnx", str(root / "model"), str(out), *args]), expected)
    assert list(tmp_path.iterdir()) == []
