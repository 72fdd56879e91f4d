"""The exporter the core's onnxruntime latency backends time: the default export (the graph and opset
a user ships), unverified, registered in `vitcompact.latency.sources.ONNX_EXPORTERS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from vitcompact.latency.sources import ONNX_EXPORTERS

from .onnx import ExportConfig, to_onnx


class TimingExporter:
    def __call__(self, module: nn.Module, path: Path, optimize: str) -> tuple[Path, str]:
        result = to_onnx(module, path, ExportConfig(verify=False, optimize=optimize))
        optimized = getattr(result, "optimized", None)
        return Path(result.path), (getattr(optimized, "reason", "") if optimized else "")

    def settings(self) -> dict[str, Any]:
        defaults = ExportConfig()
        return {"opset": defaults.opset, "graph": defaults.graph}


def register() -> None:
    if "onnx" not in ONNX_EXPORTERS:
        ONNX_EXPORTERS.register("onnx")(TimingExporter())
