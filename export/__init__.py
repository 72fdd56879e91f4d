"""ONNX, OpenVINO and TensorRT export with verified parity, and the measured choice of runtime
(installed as `vitcompact.export`)."""

from .deployment import DeployConfig, DeployResult, deploy
from .int8 import AccuracyDropError, Int8Config, to_int8
from .metadata import read_metadata
from .onnx import ExportConfig, ExportResult, to_onnx
from .openvino import OpenVINOConfig, OpenVINOResult, to_openvino
from .optimize import OptimizeReport
from .release import export_all
from .tensorrt import EngineResult, EngineRunner, TensorRTConfig, to_tensorrt, verify_tensorrt
from .variants import to_fp16
from .verify import ParityError, ParityReport, verify_onnx
from . import engine_backend  # noqa: F401,E402  (registers the tensorrt-engine latency backend)
from . import openvino_backend  # noqa: F401,E402  (registers the openvino latency backend)
from .timing_export import register as _register_timing_export

_register_timing_export()

__all__ = [
    "ExportConfig", "ExportResult", "to_onnx", "verify_onnx", "read_metadata", "to_fp16", "to_int8", "export_all",
    "Int8Config", "AccuracyDropError",
    "to_tensorrt", "TensorRTConfig", "verify_tensorrt", "EngineResult", "EngineRunner",
    "OptimizeReport", "ParityError", "ParityReport",
    "to_openvino", "OpenVINOConfig", "OpenVINOResult", "deploy", "DeployConfig", "DeployResult",
]
