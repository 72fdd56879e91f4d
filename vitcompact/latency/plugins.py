"""The one place the core loads what the export package adds to it: the ONNX exporter that the
onnxruntime backends time, and the backends that run exported files (native TensorRT engines,
OpenVINO). `vitcompact.export` registers them in the core's registries when it is imported; the
core imports it by name on first need, so arrows still point from export to the core."""

from __future__ import annotations

import importlib

PACKAGES = ("vitcompact.export",)


def load() -> None:
    """Import the packages that register exporters and backends (a no-op once imported)."""
    for name in PACKAGES:
        importlib.import_module(name)
