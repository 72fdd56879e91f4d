"""OpenVINO IR export (`.xml` + `.bin`) of a verified ONNX file: f32, bf16 or INT8, checked and recorded.

The IR comes from the ONNX file `to_onnx` writes (plain graph: onnxruntime's fused operators are its
own), through `openvino.convert_model` and `openvino.save_model(compress_to_fp16=False)`, so the
weights stay f32 unless INT8 quantises them. The ONNX file's metadata goes into the IR's `rt_info`
under `vitcompact`, and the inference precision under OpenVINO's own `runtime_options`; `compile_ir`
(`openvino_runtime.py`) passes it explicitly at compile time.

INT8 comes from NNCF post-training quantisation (transformer model type) or from vitcompact's own
static QDQ ONNX file (`to_int8`), converted; `int8_source="auto"` builds both and keeps the faster
one within the accuracy guard (`choice.choose`). The checks each precision must pass are in
`openvino_checks.py`. Nothing appears at the destination unless every check passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch.nn as nn

from vitcompact.data import DataBundle
from vitcompact.errors import ConfigError
from vitcompact.latency.timing import median_ms

from .choice import Candidate, Choice, choose
from .files import claimed, staging
from .int8 import Int8Config, to_int8
from .onnx import ExportConfig
from .openvino_checks import Images, Reference, check_reduced, reference_of, verify_ir
from .openvino_config import INT8_PICK_TIMING, METADATA_PRECISION, OpenVINOConfig
from .openvino_runtime import (HINT, PRECISIONS, SECTION, Run, compile_ir, convert_onnx, executed_precision, read_ir, read_ir_metadata, require_nncf,
                               require_openvino, runner)
from .verify import ParityReport, sample_inputs

__all__ = ["OpenVINOConfig", "OpenVINOResult", "to_openvino", "compile_ir", "read_ir", "read_ir_metadata",
           "require_openvino", "PRECISIONS"]


def ir_bin(path: Path) -> Path:
    """The weights file an IR's `.xml` names: its `.bin`, beside it."""
    return path.with_suffix(".bin")


@dataclass
class OpenVINOResult:
    """The published IR and the evidence: parity against the reference, accuracy, INT8 candidates."""

    path: Path
    precision: str
    inference_precision: str          # recorded in the IR and passed at compile time
    executed_precision: str           # what the compiled model reported on this machine
    int8_source: str | None = None
    parity: ParityReport | None = None
    accuracy: dict[str, Any] | None = None  # images, reference, openvino, drop_points
    int8_choice: Choice | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bin_path(self) -> Path:
        return ir_bin(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bin": str(self.bin_path), "precision": self.precision,
                "inference_precision": self.inference_precision, "executed_precision": self.executed_precision,
                "int8_source": self.int8_source, "parity": self.parity.to_dict() if self.parity else None,
                "accuracy": self.accuracy, "int8_choice": self.int8_choice.to_dict() if self.int8_choice else None,
                "seconds": round(self.seconds, 3)}


def publish_ir(staged: Path, path: Path) -> None:
    """Move a staged .xml and .bin into place: weights first, so the .xml never names missing ones."""
    os.replace(ir_bin(staged), ir_bin(path))
    os.replace(staged, path)


def _save(model: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    require_openvino().save_model(model, str(path), compress_to_fp16=False)
    return path


def _stamp(model: Any, metadata: dict[str, str], precision: str) -> None:
    for key, value in metadata.items():
        model.set_rt_info(value, [SECTION, key])
    model.set_rt_info(precision, list(HINT))


def _nncf_int8(onnx_path: Path, calibration: Images, config: OpenVINOConfig) -> Any:
    nncf = require_nncf()
    preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    # NNCF draws progress bars on stdout, which would corrupt `--json` output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(convert_onnx(onnx_path), nncf.Dataset(calibration.batches), preset=preset[config.preset],
                             model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration.batches))


def _qdq_int8(onnx_path: Path, stage: Path, data: DataBundle, config: OpenVINOConfig) -> Any:
    batches = math.ceil(config.calibration_images / data.train.batch_size)
    qdq = to_int8(onnx_path, stage / "qdq.onnx", Int8Config(mode="static", calib_batches=batches,
                                                            max_accuracy_drop=None), data, verify=False)
    return convert_onnx(qdq.path)


def _pick_int8(staged: dict[str, Path], ref: Reference, images: Images,
               config: OpenVINOConfig) -> Choice:
    """The faster of the INT8 IRs that pass the checks: each checked on `images`, timed at
    `config.choice_batch` (static shape), the two re-timed interleaved."""
    x = sample_inputs(ref.chw, config.choice_batch)
    timed: dict[str, Run] = {}

    def time_fn(candidate: Candidate) -> float:
        if candidate.artifact not in timed:
            timed[candidate.artifact] = runner(compile_ir(staged[candidate.artifact], threads=config.threads,
                                                          batch=config.choice_batch))
        return median_ms(lambda: timed[candidate.artifact](x), INT8_PICK_TIMING)

    def accuracy_fn(candidate: Candidate) -> float:
        run = runner(compile_ir(staged[candidate.artifact], threads=config.threads))
        report, accuracy = check_reduced(staged[candidate.artifact], run, ref, images, config)
        return accuracy["openvino"] if accuracy else report.top1_agreement[images.count]

    reference = images.top1(ref.logits(images)) if images.labels is not None else 1.0
    return choose([Candidate("openvino", f"int8 ({name})", name) for name in staged], time_fn, accuracy_fn,
                  config.max_accuracy_drop if images.labels is not None else None,
                  reference_accuracy=reference, retime_top=2, rounds=3)


def _inputs(calibration: DataBundle | Iterable[Any] | None, validation: Iterable[Any] | None,
            config: OpenVINOConfig) -> tuple[Images | None, Images | None]:
    """The calibration images (INT8 only) and the check images, refusing what cannot work first."""
    if config.precision == "int8" and config.int8_source == "qdq" and not isinstance(calibration, DataBundle):
        raise ConfigError("the QDQ INT8 source calibrates through vitcompact's ONNX INT8 export, which "
                          "takes a DataBundle (vc.load_data); pass one, or use int8_source nncf")
    if isinstance(calibration, DataBundle):
        validation = validation if validation is not None else calibration.val
        calibration = calibration.calibration()
    if config.precision == "int8" and calibration is None:
        raise ConfigError("OpenVINO INT8 needs calibration images: pass the data (its training split "
                          "calibrates), or choose f32 or bf16")
    calib = Images.of(calibration, config.calibration_images) if config.precision == "int8" else None
    return calib, Images.of(validation)


def _models(onnx_path: Path, stage: Path, calib: Images | None, calibration: Any,
            config: OpenVINOConfig) -> Iterator[tuple[str, Any]]:
    """(name, openvino.Model) of each IR to build: the converted ONNX file, or each INT8 source."""
    if config.precision != "int8":
        yield "ir", convert_onnx(onnx_path)
        return
    if config.int8_source in ("auto", "nncf"):
        yield "nncf", _nncf_int8(onnx_path, calib, config)
    if config.int8_source == "qdq" or (config.int8_source == "auto" and isinstance(calibration, DataBundle)):
        yield "qdq", _qdq_int8(onnx_path, stage, calibration, config)


def to_openvino(source: nn.Module | str | os.PathLike, out_xml: str | os.PathLike,
                config: OpenVINOConfig | None = None, calibration: DataBundle | Iterable[Any] | None = None,
                validation: Iterable[Any] | None = None, export_config: ExportConfig | None = None,
                overwrite: bool = True) -> OpenVINOResult:
    """Write the OpenVINO IR of `source` (a model, exported to ONNX first with `export_config`, or an
    FP32 ONNX file) to `out_xml` and its `.bin`, checked against the FP32 reference.

    `calibration`: a DataBundle (its unaugmented training split calibrates INT8, its validation split
    checks) or batches of images / (images, labels). `validation`: batches of (images, labels), or
    images alone (agreement only, no accuracy guard). Raises ParityError / AccuracyDropError when a
    check fails; nothing is written then. One writer at a time, and `overwrite=False` refuses an IR
    (or a `.bin`) already there (`files.claimed`), before OpenVINO is looked for.
    """
    config = config or OpenVINOConfig()
    out = Path(out_xml)
    with claimed(out, overwrite=overwrite, beside=ir_bin):
        ov = require_openvino()
        start = time.perf_counter()
        calib, check = _inputs(calibration, validation, config)
        with staging(out, ".xml") as stage:
            onnx_path, metadata, ref = reference_of(source, stage, export_config)
            metadata["precision"] = METADATA_PRECISION[config.precision]
            staged = {}
            for name, model in _models(onnx_path, stage, calib, calibration, config):
                _stamp(model, metadata, config.inference_precision)
                staged[name] = _save(model, stage / name / out.name)
            choice = _pick_int8(staged, ref, check or calib, config) if len(staged) > 1 else None
            name = choice.chosen.candidate.artifact if choice else next(iter(staged))
            model = read_ir(staged[name])
            compiled = compile_ir(model, threads=config.threads)
            parity, accuracy = (verify_ir(out, runner(compiled), ref, check or calib, config) if config.verify
                                else (None, None))
            int8_source = name if config.precision == "int8" else None
            metadata["openvino"] = json.dumps({
                "openvino": ov.__version__, "inference_precision": config.inference_precision,
                "int8_source": int8_source, "parity": parity.to_dict() if parity else None, "accuracy": accuracy,
                "int8_candidates": choice.to_dict() if choice else None, "config": asdict(config)})
            model.set_rt_info(metadata["openvino"], [SECTION, "openvino"])
            publish_ir(_save(model, stage / "final" / out.name), out)
    return OpenVINOResult(out, config.precision, config.inference_precision, executed_precision(compiled),
                          int8_source, parity, accuracy, choice, metadata, time.perf_counter() - start)
