"""OpenVINO's CPU runtime as the export, the checks and the latency backend use it: importing it (an
optional extra) with a one-line message when it is missing, reading, converting and compiling models
with every setting explicit, and the precision a CPU runs natively.

Precision is a compile-time choice on OpenVINO's CPU plugin: it runs bf16 by default wherever the
CPU has native bf16 (AMX, AVX-512 BF16) and, in 2026.4, does not apply `runtime_options` from the
IR itself (checked: the compiled model still reports bf16). So `compile_ir` reads the recorded
precision and passes `INFERENCE_PRECISION_HINT` explicitly, f32 included.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vitcompact.cpu_features import cpu_features
from vitcompact.errors import ArtifactError, BackendUnavailableError

PRECISIONS = ("f32", "bf16", "int8")
FLOAT_PRECISIONS = ("auto", "f32", "bf16")
SECTION = "vitcompact"  # the IR's rt_info section holding the ONNX file's metadata
HINT = ("runtime_options", "INFERENCE_PRECISION_HINT")

Run = Callable[[np.ndarray], np.ndarray]


def require_openvino() -> Any:
    """The openvino module, or BackendUnavailableError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("OpenVINO is not installed; pip install 'vitcompact[openvino]'") from None
    return openvino


def require_nncf() -> Any:
    try:
        # NNCF logs through torch's and its own loggers on import; its messages are not ours to print.
        with contextlib.redirect_stderr(io.StringIO()):
            import nncf
    except ImportError:
        raise BackendUnavailableError("NNCF is not installed; pip install 'vitcompact[openvino]'") from None
    nncf.set_log_level(logging.ERROR)
    return nncf


def float_precision(choice: str) -> str:
    """`auto`: bf16 where the CPU has it natively (AMX, AVX-512 BF16), else f32. Measured with INT8
    on an AVX-512 BF16 CPU, its unquantised ops in bf16 made the whole model 1.08-1.15x faster than
    in f32; without native bf16 they would be converted, not sped up."""
    if choice != "auto":
        return choice
    return "bf16" if cpu_features().native_bf16 else "f32"


def reason(error: Exception) -> str:
    """OpenVINO's message without its "Exception from <file>" lines."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip() and not l.startswith("Exception from")]
    return lines[0] if lines else type(error).__name__


@functools.cache
def _core() -> Any:
    return require_openvino().Core()


def read_ir(path: str | os.PathLike) -> Any:
    """The `openvino.Model` of an IR file; a missing or unreadable file is an ArtifactError."""
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise ArtifactError(f"{path} (with its .bin beside it) does not exist")
    try:
        return _core().read_model(str(path))
    except RuntimeError as e:
        raise ArtifactError(f"OpenVINO cannot read {path}: {reason(e)}") from None


def read_ir_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The vitcompact metadata of an IR file (the ONNX file's keys, strings as stored)."""
    info = read_ir(path).get_rt_info()
    return {key: value.astype(str) for key, value in (info[SECTION] if SECTION in info else {}).items()}


def recorded_precision(model: Any, default: str = "f32") -> str:
    """The inference precision an IR records (`runtime_options`); `default` for IRs from elsewhere."""
    return model.get_rt_info(list(HINT)).astype(str) if model.has_rt_info(list(HINT)) else default


def convert_onnx(onnx_path: Path) -> Any:
    """The `openvino.Model` of an ONNX file; a graph OpenVINO cannot read is an ArtifactError."""
    try:
        return require_openvino().convert_model(str(onnx_path))
    except Exception as e:  # the ONNX frontend raises OpConversionFailure and plain RuntimeErrors
        raise ArtifactError(f"OpenVINO cannot convert {Path(onnx_path).name}: {reason(e)}; export it with "
                            "optimize off (onnxruntime's fused operators are its own)") from None


def compile_ir(model: Any, precision: str | None = None, threads: int | None = None, streams: int = 1,
               batch: int | None = None) -> Any:
    """Compile an IR (path or `openvino.Model`) for the CPU with every setting explicit: the inference
    precision (the IR's record unless given), threads (None: OpenVINO's default), streams and the
    latency hint. `batch` fixes the batch dimension (static shapes), else it stays dynamic."""
    if isinstance(model, (str, os.PathLike)):
        model = read_ir(model)
    precision = precision or recorded_precision(model)
    if batch is not None:
        model = model.clone()
        model.reshape([batch, *model.inputs[0].get_partial_shape()[1:]])
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": streams,
              "INFERENCE_NUM_THREADS": threads or 0}
    try:
        return _core().compile_model(model, "CPU", config)
    except RuntimeError as e:
        raise ArtifactError(f"OpenVINO cannot compile the model for the CPU: {reason(e)}") from None


def executed_precision(compiled: Any) -> str:
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def runner(compiled: Any) -> Run:
    """A numpy-in, logits-out callable of a compiled model."""
    return lambda x: compiled(x)[0]
