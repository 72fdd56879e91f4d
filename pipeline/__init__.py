"""The whole loop as a library call: `run(PipelineConfig(...))` trains (optionally), prunes,
compacts, exports ONNX (and INT8), verifies, benchmarks and writes the report
(installed as `vitcompact.pipeline`; `vitcompact pipeline` and `vitcompact demo` are thin calls of it)."""

from .config import DataConfig, PipelineConfig
from .progress import Progress, Silent
from .report import render_report
from .stages import PipelineResult, run

__all__ = ["DataConfig", "PipelineConfig", "PipelineResult", "Progress", "Silent", "render_report", "run"]
