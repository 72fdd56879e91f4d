"""The whole loop as a library call: `run(PipelineConfig(...))` trains (optionally), prunes,
compacts, exports ONNX (and INT8), verifies, benchmarks, measures the choice of runtime and
precision (where OpenVINO is installed) and writes the report
(installed as `vitcompact.pipeline`; `vitcompact pipeline` and `vitcompact demo` are thin calls of it)."""

from .config import DataConfig, PipelineConfig
from .progress import Progress, Silent
from .report import render_report
from .stages import PipelineResult, run
from .summary import PipelineSummary

__all__ = ["DataConfig", "PipelineConfig", "PipelineResult", "PipelineSummary", "Progress", "Silent", "render_report",
           "run"]
