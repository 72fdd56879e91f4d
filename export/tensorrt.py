"""TensorRT engines from an exported ONNX file (optional extra `vitcompact[tensorrt]`, NVIDIA GPU).

Works with the TensorRT 10 and 11 Python APIs. TensorRT 11 removed weak typing (BuilderFlag.FP16
and friends), so precision is carried by the ONNX graph itself on both versions: an FP16 engine is
built from an FP16 copy of the model (`to_fp16`) in a strongly typed network. Buffers are torch
CUDA tensors, so no pycuda is needed.

An engine file says nothing about the model it holds, so `to_tensorrt` writes `<engine>.json` beside
it (`EngineInfo`: input size, MACs, precision, batch profile), which the bench reads.
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
from vitcompact.io import atomic_paths, json_text, read_json, scratch
from vitcompact.validate import in_range, integer

from .files import claimed
from .metadata import read_metadata
from .onnx_input import read_onnx
from .optimize import has_contrib_ops
from .verify import ParityReport, check_onnx, compare, input_shape, onnx_runner, ort_session

PRECISIONS = ("fp32", "fp16")
# Engine vs onnxruntime-fp32 max abs logit difference. FP32 engines run with TF32 disabled; their
# kernels still sum in a different order than onnxruntime's. FP16 rounds every activation.
TRT_ATOL = {"fp32": 1e-3, "fp16": 5e-2}
ENGINE_SUFFIXES = (".engine", ".plan")


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


def info_path(engine_path: str | os.PathLike) -> Path:
    """Where an engine's `EngineInfo` lives: `<engine>.json` beside it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class EngineInfo:
    """What an engine file does not record about the model it holds, written beside it by
    `to_tensorrt` and read by the bench (input size for its inputs, MACs for the ideal speed-up)."""

    input_size: tuple[int, int, int]  # C, H, W
    macs: int | None                  # per image; None when the ONNX file did not record it
    precision: str
    profile: tuple[int, int, int]     # min, opt, max batch
    onnx: str                         # the name of the ONNX file it was built from
    tensorrt: str                     # the version that built it, the only one that loads it

    @classmethod
    def for_build(cls, onnx_path: Path, metadata: dict[str, Any], config: TensorRTConfig,
                  tensorrt_version: str) -> "EngineInfo":
        # An ONNX file exported elsewhere has no input_size metadata: read its fixed C, H, W instead.
        size = metadata.get("input_size") or input_shape(ort_session(onnx_path))[1]
        return cls(tuple(size), metadata.get("macs"), config.precision,
                   (config.min_batch, config.opt_batch, config.max_batch), onnx_path.name, tensorrt_version)

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "precision": self.precision, "tensorrt": self.tensorrt,
                "profile": dict(zip(("min", "opt", "max"), self.profile)),
                "input_size": list(self.input_size), "macs": self.macs}

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> "EngineInfo":
        """The info in `data` (read from `source`), or an ArtifactError saying what is wrong."""
        def bad(problem: str) -> ArtifactError:
            return ArtifactError(f"{source}: {problem}; build the engine again with "
                                 "`vitcompact export tensorrt`")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        size, macs, precision = data.get("input_size"), data.get("macs"), data.get("precision")
        profile = data.get("profile")
        if not (isinstance(size, list) and len(size) == 3 and all(_whole(d, 1) for d in size)):
            raise bad(f"input_size must be [C, H, W] in positive integers, not {size!r}")
        if macs is not None and not _whole(macs, 0):
            raise bad(f"macs must be a non-negative integer or null, not {macs!r}")
        if precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        batches = tuple(profile.get(k) for k in ("min", "opt", "max")) if isinstance(profile, dict) else ()
        if not (len(batches) == 3 and all(_whole(b, 1) for b in batches) and list(batches) == sorted(batches)):
            raise bad(f"profile must be {{min, opt, max}} batches with 1 <= min <= opt <= max, "
                      f"not {profile!r}")
        return cls(tuple(size), macs, precision, batches, str(data.get("onnx", "")),
                   str(data.get("tensorrt", "")))

    @classmethod
    def read(cls, engine_path: str | os.PathLike) -> "EngineInfo":
        """The info beside `engine_path`; a one-line ArtifactError when it is missing or malformed."""
        path = info_path(engine_path)
        if not path.exists():
            raise ArtifactError(f"{engine_path} has no {path.name} beside it (input size and MACs); build "
                                "the engine with `vitcompact export tensorrt`, which writes both")
        return cls.from_dict(read_json(path), path)


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


def _source_metadata(onnx_path: Path) -> dict[str, Any]:
    """The metadata of an ONNX file TensorRT can be built from; refuses one it cannot, before building."""
    read_onnx(onnx_path)
    check_onnx(onnx_path)
    metadata = read_metadata(onnx_path)
    if metadata.get("precision", "fp32") != "fp32":
        raise ConfigError(f"{onnx_path} is not an fp32 export; build engines from the fp32 ONNX "
                          "file (use --fp16 for an FP16 engine)")
    if has_contrib_ops(onnx_path):
        raise ConfigError(f"{onnx_path} holds onnxruntime-only fused operators, which TensorRT cannot "
                          "parse; export it again with --optimize off")
    return metadata


def to_tensorrt(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                config: TensorRTConfig | None = None, overwrite: bool = True) -> EngineResult:
    """Build a serialised engine with a dynamic-batch profile from the fp32 ONNX file `onnx_path`.

    The engine is written beside `engine_path` under a temporary name and verified there; only then
    are it and its `<engine>.json` renamed into place, so a failed check leaves no engine behind and
    an earlier engine (with its JSON) as it was. One writer at a time, and `overwrite=False` refuses
    an engine (or its JSON) already there (`files.claimed`), before TensorRT is looked for.
    """
    config = config or TensorRTConfig()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    with claimed(engine_path, overwrite=overwrite, beside=info_path):
        trt = require_tensorrt()
        start = time.perf_counter()
        info = EngineInfo.for_build(onnx_path, _source_metadata(onnx_path), config, trt.__version__)
        with scratch("vitcompact-trt-") as tmp:
            source = onnx_path
            if config.precision == "fp16":
                from .variants import to_fp16

                source = to_fp16(onnx_path, Path(tmp) / "model.fp16.onnx", verify=False).path
            engine = _build(trt, source, config)
        parity = None
        with atomic_paths(engine_path, info_path(engine_path)) as (staged, staged_info):
            staged.write_bytes(engine)
            if config.verify:
                parity = verify_tensorrt(staged, onnx_path, config.check_batches, config.tolerance,
                                         report_path=engine_path).raise_if_failed()
            staged_info.write_text(json_text(info.to_dict()))
    return EngineResult(engine_path, onnx_path, config.precision, info.profile, trt.__version__, parity,
                        time.perf_counter() - start)


class EngineRunner:
    """Runs a serialised engine on torch CUDA tensors (one input, one output), on a stream of its own:
    on the default stream TensorRT adds synchronisations that a latency measurement would include."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = require_tensorrt()
        path = Path(engine_path)
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist")
        self.path = path
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
        self.stream = torch.cuda.Stream()

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The per-image input shape (C, H, W) the engine was built for."""
        return tuple(int(d) for d in self.engine.get_tensor_shape(self.input))[1:]

    @property
    def batch_range(self) -> tuple[int, int]:
        """The smallest and largest batch of the engine's optimisation profile."""
        low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
        return int(low[0]), int(high[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to("cuda", self.input_dtype).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            low, high = self.batch_range
            raise ArtifactError(f"{self.path.name} takes batches {low}..{high} of {list(self.image_shape)}, "
                                f"not {list(x.shape)}")
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # x may still be being written on the caller's stream
        with torch.cuda.stream(self.stream):
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.output_dtype,
                              device="cuda")
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            ran = self.context.execute_async_v3(self.stream.cuda_stream)
        caller.wait_stream(self.stream)  # the caller's later work (and frees) come after the engine's
        if not ran:
            raise ArtifactError("TensorRT failed to run the engine (batch outside the profile?)")
        return out

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(x)).float().cpu().numpy()


def verify_tensorrt(engine_path: str | os.PathLike, onnx_path: str | os.PathLike,
                    batch_sizes: Sequence[int] = (1, 3), atol: float = TRT_ATOL["fp32"], *,
                    report_path: str | os.PathLike | None = None) -> ParityReport:
    """The engine against onnxruntime (CPU) on the fp32 ONNX file, at each batch size.

    `report_path` names the engine in the report when `engine_path` is a staged copy of it.
    """
    runner = EngineRunner(engine_path)
    session = ort_session(onnx_path)
    _, chw = input_shape(session)
    return compare(Path(report_path or engine_path), f"onnxruntime ({Path(onnx_path).name})",
                   runner.run_numpy, onnx_runner(session), chw, batch_sizes, atol)
