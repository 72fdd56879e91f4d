"""INT8 quantisation of an exported fp32 ONNX file: dynamic, or static calibrated on training images.

Dynamic: int8 weights, each activation's scale computed at run time. Static: int8 weights (one
scale per output channel) and activation scales fixed beforehand from calibration images of the
*training* split, in onnxruntime's QDQ format. The test split is only ever used to report accuracy.

What stays FP32 was chosen by measurement (`bench/int8_stacked.py`, README "Stacked INT8"): scope
"linear" quantises the linear layers (qkv, proj, fc1, fc2, head) and keeps their outputs in float,
so LayerNorm, GELU, softmax, attention's two activation products and the patch embedding stay FP32.
Scope "all" also quantises the patch embedding and what onnxruntime can between the layers; it
measured slower on both bench models.

Given data, the file's validation and test top-1 are measured beside the fp32 file's and written
into its metadata; a validation drop beyond `max_accuracy_drop` points refuses the file.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitcompact.data import DataBundle
from vitcompact.errors import ArtifactError, ConfigError, VitCompactError
from vitcompact.validate import finite, flag, integer, one_of

from .files import data_file, staging
from .onnx import ExportResult
from .variants import finish_variant, fp32_source, quiet_root_logger, variant_path
from .verify import loader_top1, onnx_runner, ort_session

INT8_MODES = ("dynamic", "static")
CALIBRATIONS = ("minmax", "entropy", "percentile")
INT8_SCOPES = ("linear", "all")
# The ops that carry the model's weights.
WEIGHT_OPS = ["MatMul", "Gemm", "Conv"]
# What "linear" quantises. onnxruntime runs a QDQ Conv whose output stays float as dequantise +
# FP32 Conv, so quantising the patch embedding there would only add work (README "Stacked INT8").
LINEAR_OPS = ["MatMul", "Gemm"]


class AccuracyDropError(VitCompactError):
    """The INT8 file loses more validation accuracy than allowed; nothing was written."""


@dataclass
class Int8Config:
    """How `to_int8` quantises. Calibration settings apply to `mode="static"` only."""

    mode: str = "dynamic"
    calibration: str = "minmax"    # how activation ranges are set: minmax, entropy, percentile
    calib_batches: int = 16        # training batches fed to the calibrator
    per_channel: bool = True       # one weight scale per output channel
    scope: str = "linear"          # linear: linear layers only; all: every op onnxruntime can
    fp32_ends: bool = False        # keep the head in FP32 (and, in scope "all", the patch embedding)
    max_accuracy_drop: float | None = 1.0  # validation top-1 points; None: measure, never refuse

    def __post_init__(self) -> None:
        one_of("int8 mode", self.mode, INT8_MODES)
        one_of("calibration method", self.calibration, CALIBRATIONS)
        one_of("int8 scope", self.scope, INT8_SCOPES)
        integer("calib_batches", self.calib_batches, 1)
        flag("per_channel", self.per_channel)
        flag("fp32_ends", self.fp32_ends)
        if self.max_accuracy_drop is not None and finite("max_accuracy_drop", self.max_accuracy_drop) < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop}")


@dataclass
class SplitAccuracy:
    """Top-1 of the fp32 source and of the INT8 file on one split."""

    images: int
    fp32: float
    int8: float

    @property
    def drop_points(self) -> float:
        return (self.fp32 - self.int8) * 100.0


def _images(loader) -> int:
    return len(loader.dataset)


def measure(src: Path, quantised: Path, data: DataBundle) -> dict[str, SplitAccuracy]:
    """Validation and test top-1 of both files (onnxruntime CPU)."""
    fp32, int8 = onnx_runner(ort_session(src)), onnx_runner(ort_session(quantised))
    return {split: SplitAccuracy(_images(loader), loader_top1(fp32, loader), loader_top1(int8, loader))
            for split, loader in (("val", data.val), ("test", data.test))}


def _calibration_reader(src: Path, data: DataBundle, batches: int):
    from onnxruntime.quantization import CalibrationDataReader

    input_name = ort_session(src).get_inputs()[0].name

    class TrainingImages(CalibrationDataReader):
        """The first `batches` batches of the training split, unaugmented, in a fixed order."""

        def __init__(self) -> None:
            self.batches = itertools.islice(iter(data.calibration()), batches)
            self.count = 0

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.count += len(batch[0])
            return {input_name: batch[0].numpy()}

    return TrainingImages()


# onnxruntime's entropy calibrator defaults to as many histogram bins as quantised bins, which
# leaves it one candidate threshold: the min-max range. 512 bins give it 193 to choose from.
ENTROPY_BINS = {"num_bins": 512, "num_quantized_bins": 128}


def _activation_ranges(prepared: Path, op_types: list[str] | None, config: Int8Config, reader,
                       external: bool) -> dict[str, list[dict[str, Any]]]:
    """Each calibrated tensor's range by the configured method, as quantiser range overrides."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.calibration]
    options = {"symmetric": True, **(ENTROPY_BINS if config.calibration == "entropy" else {})}
    calibrator = create_calibrator(prepared, op_types, augmented_model_path=prepared.with_name("augmented.onnx"),
                                   calibrate_method=method, use_external_data_format=external,
                                   extra_options=options)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    return {name: [dict(zip(("rmin", "rmax"), ranges[name].range_value))] for name in ranges}


def end_layers(path: Path) -> list[str]:
    """Node names of the patch embedding (the graph's convolutions) and of the classifier head (the
    last weight layer on the way back from the output)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    names = [n.name for n in graph.node if n.op_type == "Conv"]
    frontier = [o.name for o in graph.output]
    seen: set[str] = set()
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in WEIGHT_OPS:
            names.append(node.name)
        else:
            frontier.extend(node.input)
    return names


def activation_products(path: Path) -> list[str]:
    """Node names of the matmuls of two activations (attention's q·kᵀ and weights·v): no weight
    there, so "linear" keeps them FP32 (onnxruntime's MatMulConstBOnly is ignored in QDQ format)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not weights.intersection(n.input)]


def _quantise_static(src: Path, staged: Path, config: Int8Config, data: DataBundle, external: bool) -> int:
    """Write the static QDQ model of `src` to `staged`; returns the number of calibration images.

    The ranges come from our own calibrator run (so every method gets usable settings) and reach
    the quantiser as per-tensor overrides; its own min-max pass then needs only one batch.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Shape inference and constant folding first, as onnxruntime recommends for static quantisation.
    prepared = staged.with_name("prepared.onnx")
    quant_pre_process(str(src), str(prepared), save_as_external_data=external,
                      external_data_location=data_file(prepared).name)
    linear = config.scope == "linear"
    op_types = LINEAR_OPS if linear else None
    reader = _calibration_reader(src, data, config.calib_batches)
    extra = {"ActivationSymmetric": True,
             "TensorQuantOverrides": _activation_ranges(prepared, op_types, config, reader, external)}
    if linear:
        extra.update(OpTypesToExcludeOutputQuantization=LINEAR_OPS)
    quantize_static(str(prepared), str(staged), _calibration_reader(src, data, 1), quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                    nodes_to_exclude=((activation_products(prepared) if linear else [])
                                      + (end_layers(prepared) if config.fp32_ends else [])),
                    use_external_data_format=external, extra_options=extra)
    for leftover in (prepared, data_file(prepared), prepared.with_name("augmented.onnx")):
        leftover.unlink(missing_ok=True)
    return reader.count


def _quantise_dynamic(src: Path, staged: Path, config: Int8Config, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(staged), weight_type=QuantType.QInt8, per_channel=config.per_channel,
                     use_external_data_format=external)


def to_int8(src: str | os.PathLike, dst: str | os.PathLike | None = None, config: Int8Config | None = None,
            data: DataBundle | None = None, verify: bool = True,
            external_data: bool | None = None) -> ExportResult:
    """An INT8 copy of the fp32 ONNX file `src` (default `<stem>.int8.onnx` beside it).

    `data` (a `DataBundle` at the model's input size) is required for static quantisation, which
    calibrates on its training split. Given data, validation and test top-1 of both files are
    measured and recorded in the file's `int8` metadata; a validation drop of more than
    `config.max_accuracy_drop` points raises `AccuracyDropError` and writes nothing.
    """
    config = config or Int8Config()
    if config.mode == "static" and data is None:
        raise ConfigError("static INT8 needs calibration images: pass the data (its training split "
                          "is used), or use dynamic INT8")
    start = time.perf_counter()
    src, meta = fp32_source(src)
    dst = Path(dst) if dst is not None else variant_path(src, "int8")
    external = bool(external_data or data_file(src).exists())
    static_only = () if config.mode == "static" else ("calibration", "calib_batches", "scope", "fp32_ends")
    record: dict[str, Any] = {k: v for k, v in asdict(config).items() if k not in static_only}
    # The calibrators print progress to stdout, which would corrupt `--json` output.
    with staging(dst) as stage, quiet_root_logger(), contextlib.redirect_stdout(io.StringIO()):
        staged = stage / dst.name
        try:
            if config.mode == "static":
                record["calibration_images"] = _quantise_static(src, staged, config, data, external)
                record["calibration_split"] = "train"
            else:
                _quantise_dynamic(src, staged, config, external)
        except VitCompactError:
            raise
        except Exception as e:  # the quantiser raises bare exceptions on graphs it cannot handle
            raise ArtifactError(f"onnxruntime could not quantise {src}: {type(e).__name__}: {e}") from None
        if data is not None:
            accuracy = measure(src, staged, data)
            record["accuracy"] = {split: {**asdict(a), "drop_points": round(a.drop_points, 4)}
                                  for split, a in accuracy.items()}
            _guard(accuracy["val"], config, dst)
        # Checked on validation images where there are some: a static file is calibrated for
        # real inputs, and on noise its error says nothing about its use.
        images = next(iter(data.val))[0].numpy() if data is not None else None
        return finish_variant(staged, src, dst, {**meta, "int8": json.dumps(record)}, "int8", verify, start,
                              images)


def _guard(val: SplitAccuracy, config: Int8Config, dst: Path) -> None:
    if config.max_accuracy_drop is not None and val.drop_points > config.max_accuracy_drop:
        raise AccuracyDropError(
            f"{config.mode} INT8 loses {val.drop_points:.2f} points of validation top-1 (fp32 "
            f"{val.fp32:.4f}, int8 {val.int8:.4f} on {val.images} images), more than the allowed "
            f"{config.max_accuracy_drop:g}; {dst} not written (try another calibration method, "
            "dynamic INT8, or a larger max accuracy drop)")
