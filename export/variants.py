"""Reduced-precision variants of an exported fp32 ONNX file: FP16 (for GPUs) here, INT8 in `int8.py`.

Both keep float32 inputs and outputs, so the same preprocessing feeds every variant. Their outputs
differ from fp32 by design; each variant reports its difference and top-1 agreement with the fp32
file, and `bench/export_variants.py` measures the accuracy effect on real data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from vitcompact.errors import ArtifactError, ConfigError

from .files import data_file, publish, save_onnx, staging
from .metadata import raw_metadata
from .onnx import ExportResult, opset_of, restamp
from .onnx_input import read_onnx
from .verify import DEFAULT_BATCHES, check_onnx, verify_against_onnx

# Loose sanity bounds on max abs logit difference against fp32, for the report's pass flag only.
VARIANT_ATOL = {"fp16": 1e-2, "int8": 0.25}


def variant_path(src: Path, precision: str) -> Path:
    return src.with_name(f"{src.stem}.{precision}.onnx")


def fp32_source(src: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """The fp32 ONNX file a variant is made from (checked by `read_onnx`) and its metadata."""
    src = Path(src)
    if not src.exists():
        raise ArtifactError(f"{src} does not exist; export the fp32 model first (to_onnx)")
    meta = read_onnx(src).metadata
    if meta.get("precision", "fp32") != "fp32":
        raise ConfigError(f"{src} is already {meta['precision']}; convert the fp32 export instead")
    return src, meta


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization warns through the root logger to suggest its optional pre-processing.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def finish_variant(staged: Path, src: Path, dst: Path, meta: dict[str, str], precision: str,
                   verify: bool, start: float, images: np.ndarray | None = None) -> ExportResult:
    proto = restamp(staged, {**meta, "precision": precision})
    parity = None
    if verify:
        check_onnx(staged)
        parity = verify_against_onnx(staged, src, DEFAULT_BATCHES, VARIANT_ATOL[precision], images)
    external = data_file(staged).exists()
    publish(staged, dst)
    return ExportResult(dst, precision, opset_of(proto), parity, None, external, raw_metadata(proto),
                        time.perf_counter() - start)


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike | None = None, verify: bool = True,
            external_data: bool | None = None) -> ExportResult:
    """An FP16 copy of the fp32 ONNX file `src` (default `<stem>.fp16.onnx` beside it)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    start = time.perf_counter()
    src, meta = fp32_source(src)
    dst = Path(dst) if dst is not None else variant_path(src, "fp16")
    with staging(dst) as stage:
        staged = stage / dst.name
        model = OnnxModel(onnx.load(str(src)))
        model.convert_float_to_float16(keep_io_types=True)
        # The converter appends the input casts after their consumers; ONNX requires sorted nodes.
        model.topological_sort()
        save_onnx(model.model, staged, external_data)
        return finish_variant(staged, src, dst, meta, "fp16", verify, start)
