"""ONNX and TensorRT export with verified parity (installed as `vitcompact.export`)."""

from .onnx import ExportConfig, ExportResult, to_onnx

__all__ = ["ExportConfig", "ExportResult", "to_onnx"]
