"""ONNX export of (compact) timm ViTs. Minimal first version; extended by issue 4."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vitcompact.io import atomic_path


@dataclass
class ExportConfig:
    opset: int = 18
    input_name: str = "images"
    output_name: str = "logits"


@dataclass
class ExportResult:
    path: Path


def to_onnx(model: nn.Module, path: str | os.PathLike, config: ExportConfig | None = None) -> ExportResult:
    """Export with a dynamic batch axis through the dynamo exporter."""
    config = config or ExportConfig()
    model = model.eval()
    in_chans = model.patch_embed.proj.in_channels
    h, w = model.patch_embed.img_size
    example = torch.randn(2, in_chans, h, w)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx_tmp = tmp.with_suffix(".onnx")
        torch.onnx.export(model, (example,), str(onnx_tmp), dynamo=True, opset_version=config.opset,
                          input_names=[config.input_name], output_names=[config.output_name],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
        os.replace(onnx_tmp, tmp)
    return ExportResult(path)
