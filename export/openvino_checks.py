"""What an OpenVINO IR must reproduce before it is written, and the checks that can refuse it.

The reference is the FP32 model: PyTorch for a module (exported to ONNX first), onnxruntime on the
file for an FP32 ONNX file. f32 must match it to the ONNX tolerance on noise; bf16 and INT8 within
a logits tolerance (a fraction of the largest reference logit) and a top-1 agreement on validation
images (noise without them), and their validation top-1 within `max_accuracy_drop` points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch.nn as nn

from vitcompact.errors import ConfigError
from vitcompact.models import input_size

from .int8 import AccuracyDropError
from .onnx import ExportConfig, to_onnx
from .openvino_config import OpenVINOConfig
from .openvino_runtime import Run
from .variants import fp32_source
from .verify import (ParityError, ParityReport, compare, input_shape, onnx_runner, ort_session, sample_inputs,
                     torch_runner)



@dataclass
class Images:
    """Image batches as numpy arrays, with their labels where the source had them."""

    batches: list[np.ndarray]
    labels: list[np.ndarray] | None

    @classmethod
    def of(cls, source: Iterable[Any] | None, limit: int | None = None) -> "Images | None":
        """Batches of images, or of (images, labels), from a DataLoader or any iterable."""
        if source is None:
            return None
        batches, labels, taken = [], [], 0
        for item in source:
            images, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
            images = np.asarray(images.numpy() if hasattr(images, "numpy") else images, dtype=np.float32)
            if limit is not None:
                images = images[:limit - taken]
            batches.append(images)
            labels.append(None if label is None else np.asarray(label)[:len(images)])
            taken += len(images)
            if limit is not None and taken >= limit:
                break
        if not batches:
            raise ConfigError("the calibration or validation data holds no images")
        return cls(batches, None if any(l is None for l in labels) else labels)

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches)

    def logits(self, run: Run) -> np.ndarray:
        return np.concatenate([np.asarray(run(b), dtype=np.float32) for b in self.batches])

    def top1(self, logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == np.concatenate(self.labels)).mean())


@dataclass
class Reference:
    """The FP32 model the IR must reproduce, and what it computes on the check images."""

    name: str
    run: Run
    chw: list[int]
    _seen: list[tuple[Images, np.ndarray]] = field(default_factory=list)

    def logits(self, images: Images) -> np.ndarray:
        """The reference's logits on `images`, computed once per image set."""
        for seen, logits in self._seen:
            if seen is images:
                return logits
        self._seen.append((images, images.logits(self.run)))
        return self._seen[-1][1]


def reference_of(source: nn.Module | str | os.PathLike, stage: Path,
                 export_config: ExportConfig | None) -> tuple[Path, dict[str, str], Reference]:
    """The verified FP32 ONNX file (exported first from a module), its metadata and the reference."""
    if isinstance(source, nn.Module):
        result = to_onnx(source, stage / "model.onnx", replace(export_config or ExportConfig(), optimize="off"))
        reference = Reference("PyTorch", torch_runner(source.eval()), list(input_size(source)))
        return result.path, dict(result.metadata), reference
    path, meta = fp32_source(source)
    session = ort_session(path)
    return path, meta, Reference(f"{path.name} on onnxruntime", onnx_runner(session), input_shape(session)[1])


def check_f32(path: Path, run: Run, ref: Reference, config: OpenVINOConfig) -> ParityReport:
    return compare(path, ref.name, run, ref.run, ref.chw, config.batch_sizes, config.atol).raise_if_failed()


def _guard(label: str, path: Path, ref: Reference, images: Images, got: np.ndarray, want: np.ndarray,
           config: OpenVINOConfig) -> dict[str, Any]:
    """Validation top-1 of the IR and the reference; AccuracyDropError beyond the guard."""
    accuracy = {"images": images.count, "reference": images.top1(want), "openvino": images.top1(got)}
    accuracy["drop_points"] = round((accuracy["reference"] - accuracy["openvino"]) * 100.0, 4)
    if config.max_accuracy_drop is not None and accuracy["drop_points"] > config.max_accuracy_drop:
        raise AccuracyDropError(
            f"{label} loses {accuracy['drop_points']:.2f} points of validation top-1 ({ref.name} "
            f"{accuracy['reference']:.4f}, OpenVINO {accuracy['openvino']:.4f} on {images.count} images), "
            f"more than the allowed {config.max_accuracy_drop:g}; {path.name} not written")
    return accuracy


def check_reduced(path: Path, run: Run, ref: Reference, images: Images | None,
                  config: OpenVINOConfig) -> tuple[ParityReport, dict[str, Any] | None]:
    """Logits tolerance and top-1 agreement on `images` (normal noise without them), then the accuracy
    guard where they have labels; a failure is an ArtifactError, one line."""
    if images is None:
        images = Images([sample_inputs(ref.chw, b) for b in config.batch_sizes], None)
    got, want = images.logits(run), ref.logits(images)
    scale = float(np.abs(want).max()) or 1.0
    report = ParityReport(path, f"{ref.name} on {images.count} images", config.rtol * scale,
                          {images.count: float(np.abs(got - want).max())},
                          {images.count: float((got.argmax(-1) == want.argmax(-1)).mean())})
    label = f"OpenVINO {config.precision}"
    if not report.passed:
        raise ParityError(f"{label} logits differ from {ref.name} by {report.worst:.3g}, more than "
                          f"{config.rtol:g} of the largest logit ({scale:.3g}); {path.name} not written "
                          "(raise logits_rtol, or use another precision)")
    agreement = report.top1_agreement[images.count]
    if agreement < config.min_top1_agreement:
        raise ParityError(f"{label} agrees with {ref.name} on the top-1 class of {agreement:.1%} of "
                          f"{images.count} images, below {config.min_top1_agreement:.0%}; {path.name} not written")
    accuracy = _guard(label, path, ref, images, got, want, config) if images.labels is not None else None
    return report, accuracy


def verify_ir(path: Path, run: Run, ref: Reference, images: Images | None,
              config: OpenVINOConfig) -> tuple[ParityReport, dict[str, Any] | None]:
    """The check of the IR's precision: parity for f32, tolerance, agreement and guard otherwise."""
    if config.precision == "f32":
        return check_f32(path, run, ref, config), None
    return check_reduced(path, run, ref, images, config)
