"""`export_all`: the fp32 ONNX file and its variants, published together or not at all."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch.nn as nn

from vitcompact.data import DataBundle
from vitcompact.errors import ArtifactError

from .files import claimed, publish_all, staging
from .int8 import Int8Config, to_int8
from .onnx import ExportConfig, ExportResult, to_onnx
from .variants import to_fp16, variant_path


def export_all(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None, fp16: bool = False,
               int8: Int8Config | None = None, data: DataBundle | None = None,
               overwrite: bool = True) -> list[ExportResult]:
    """`to_onnx` to `path`, then the FP16 and INT8 variants beside it, as asked. With variants, every
    file is made in a staging folder and moved into place only when all are done: a refused INT8
    file (`AccuracyDropError`) leaves nothing behind, not even the fp32 file, and a file that cannot
    be moved into place puts back what was there. One writer at a time, and `overwrite=False`
    refuses files already there (`files.claimed`)."""
    config, path = config or ExportConfig(), Path(path)
    outputs = ([path] + ([variant_path(path, "fp16")] if fp16 else [])
               + ([variant_path(path, "int8")] if int8 is not None else []))
    with claimed(path, outputs, overwrite):
        if not fp16 and int8 is None:
            return [to_onnx(model, path, config)]
        with staging(path) as stage:
            staged = stage / path.name
            try:
                results = [to_onnx(model, staged, config)]
                if fp16:
                    results.append(to_fp16(staged, verify=config.verify))
                if int8 is not None:
                    results.append(to_int8(staged, config=int8, data=data, verify=config.verify))
            except ArtifactError as e:  # name the file the user asked for, not the staging folder
                raise ArtifactError(str(e).replace(str(stage), str(path.parent))) from None
            published = publish_all([(r.path, path.with_name(r.path.name)) for r in results], stage / "previous")
            return [dataclasses.replace(r, path=p) for r, p in zip(results, published)]
