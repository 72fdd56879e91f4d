"""TensorRT engines from an exported ONNX file (optional extra `vitcompact[tensorrt]`, NVIDIA GPU).

Works with the TensorRT 10 and 11 Python APIs. TensorRT 11 removed weak typing (BuilderFlag.FP16
and friends), so precision is carried by the ONNX graph itself on both versions: an FP16 engine is
built from an FP16 copy of the model (`to_fp16`) in a strongly typed network. Buffers are torch
CUDA tensors, so no pycuda is needed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vitcompact.errors import ArtifactError, BackendUnavailableError, ConfigError
from vitcompact.io import atomic_path, scratch, write_json
from vitcompact.validate import in_range, integer

from .metadata import read_metadata
from .optimize import has_contrib_ops
from .verify import ParityReport, check_onnx, compare, input_shape, onnx_runner, ort_session

PRECISIONS = ("fp32", "fp16")
# Engine vs onnxruntime-fp32 max abs logit difference. FP32 engines run with TF32 disabled; their
# kernels still sum in a different order than onnxruntime's. FP16 rounds every activation.
TRT_ATOL = {"fp32": 1e-3, "fp16": 5e-2}


@dataclass
class TensorRTConfig:
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_gib: float = 4.0
    verify: bool = True
    batch_sizes: tuple[int, ...] | None = None  # None: the profile's min and 3 (clamped to the profile)
    atol: float | None = None  # None: TRT_ATOL[precision]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TensorRTConfig":
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name in ("min_batch", "opt_batch", "max_batch"):
            integer(name, getattr(self, name), 1)
        in_range("workspace_gib", self.workspace_gib, 0.0, low_open=True)
        if self.atol is not None:
            in_range("atol", self.atol, 0.0, low_open=True)
        for b in self.batch_sizes or ():
            integer("verification batch size", b, 1)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                              f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        outside = [b for b in self.check_batches if not self.min_batch <= b <= self.max_batch]
        if outside:
            raise ConfigError(f"verification batch sizes {outside} lie outside the profile "
                              f"{self.min_batch}..{self.max_batch}")
        return self

    @property
    def check_batches(self) -> tuple[int, ...]:
        if self.batch_sizes is not None:
            return tuple(self.batch_sizes)
        return tuple(sorted({self.min_batch, min(max(3, self.min_batch), self.max_batch)}))

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else TRT_ATOL[self.precision]


@dataclass
class EngineResult:
    path: Path
    onnx_path: Path
    precision: str
    profile: tuple[int, int, int]
    tensorrt_version: str
    parity: ParityReport | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "onnx": str(self.onnx_path), "precision": self.precision,
                "profile": {"min": self.profile[0], "opt": self.profile[1], "max": self.profile[2]},
                "tensorrt": self.tensorrt_version, "seconds": round(self.seconds, 3),
                "parity": self.parity.to_dict() if self.parity is not None else None}


def require_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed; on a machine with an NVIDIA GPU run "
            "pip install 'vitcompact[tensorrt]'") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here")
    return trt


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.ERROR)


def _build(trt: Any, onnx_path: Path, config: TensorRTConfig) -> bytes:
    builder = trt.Builder(_logger(trt))
    flags = 0
    # Present in 10 (opt-in) and 11 (accepted, always on): one code path for both.
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    # TF32 would silently lower FP32 matmuls to 10-bit mantissas; an FP32 engine should be FP32.
    if hasattr(trt.BuilderFlag, "TF32"):
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    inp = network.get_input(0)
    chw = tuple(inp.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (config.min_batch, *chw), (config.opt_batch, *chw), (config.max_batch, *chw))
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ArtifactError(f"TensorRT could not build an engine from {onnx_path.name}; "
                            "rerun with a larger workspace or check the TensorRT log")
    return bytes(serialized)


def to_tensorrt(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                config: TensorRTConfig | None = None) -> EngineResult:
    """Build a serialised engine with a dynamic-batch profile from the fp32 ONNX file `onnx_path`."""
    trt = require_tensorrt()
    config = (config or TensorRTConfig()).validate()
    start = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_onnx(onnx_path)
    if read_metadata(onnx_path).get("precision", "fp32") != "fp32":
        raise ConfigError(f"{onnx_path} is not an fp32 export; build engines from the fp32 ONNX "
                          "file (use --fp16 for an FP16 engine)")
    if has_contrib_ops(onnx_path):
        raise ConfigError(f"{onnx_path} holds onnxruntime-only fused operators, which TensorRT cannot "
                          "parse; export it again with --optimize off")
    with scratch("vitcompact-trt-") as tmp:
        source = onnx_path
        if config.precision == "fp16":
            from .variants import to_fp16

            source = to_fp16(onnx_path, Path(tmp) / "model.fp16.onnx", verify=False).path
        engine = _build(trt, source, config)
    with atomic_path(engine_path) as staged:
        staged.write_bytes(engine)
    profile = (config.min_batch, config.opt_batch, config.max_batch)
    write_json(engine_path.with_name(engine_path.name + ".json"),
               {"onnx": onnx_path.name, "precision": config.precision, "tensorrt": trt.__version__,
                "profile": dict(zip(("min", "opt", "max"), profile))})
    parity = None
    if config.verify:
        parity = verify_tensorrt(engine_path, onnx_path, config.check_batches, config.tolerance).raise_if_failed()
    return EngineResult(engine_path, onnx_path, config.precision, profile, trt.__version__, parity,
                        time.perf_counter() - start)


class EngineRunner:
    """Runs a serialised engine on torch CUDA tensors (one input, one output)."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = require_tensorrt()
        path = Path(engine_path)
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist")
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path} is not an engine this TensorRT {trt.__version__} and GPU can load; "
                                "build it again on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{path} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input, self.output = inputs[0], outputs[0]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", self.input_dtype).contiguous()
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype, device="cuda")
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ArtifactError("TensorRT failed to run the engine (batch outside the profile?)")
        return out

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(x)).float().cpu().numpy()


def verify_tensorrt(engine_path: str | os.PathLike, onnx_path: str | os.PathLike,
                    batch_sizes: Sequence[int] = (1, 3), atol: float = TRT_ATOL["fp32"]) -> ParityReport:
    """The engine against onnxruntime (CPU) on the fp32 ONNX file, at each batch size."""
    runner = EngineRunner(engine_path)
    session = ort_session(onnx_path)
    _, chw = input_shape(session)
    return compare(Path(engine_path), f"onnxruntime ({Path(onnx_path).name})", runner.run_numpy,
                   onnx_runner(session), chw, batch_sizes, atol)
