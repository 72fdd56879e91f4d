"""Inference backends the timing loop runs: onnxruntime (CPU, CUDA, and its TensorRT provider as
`tensorrt`), PyTorch eager on CPU and PyTorch on a CUDA GPU (FP32 or FP16, replayed as CUDA graphs).
Backends that run exported files register here from `vitcompact.export` (native TensorRT on the
engine files `vitcompact export tensorrt` writes, `tensorrt-engine`; OpenVINO).

A backend loads a `BenchModel` once and hands out, per batch size, a callable that runs one
inference on a fixed random batch and returns only when the result is ready (GPU work included),
so the harness can time it with a wall clock. Thread settings are pinned at load and reported by
`settings()`; they go into the benchmark's environment record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError
from ..registry import Registry
from . import plugins
from .sources import BenchModel

Runner = Callable[[], object]
Loaded = Callable[[int], Runner]  # batch size -> one-inference callable


class Backend(Protocol):
    name: str
    on_gpu: bool

    def load(self, model: BenchModel) -> Loaded: ...

    def settings(self) -> dict: ...


@dataclass(frozen=True)
class BackendOptions:
    threads: int
    graph_optimization: str = "all"
    onnx_optimize: str = "off"  # the exporter's transformer fusion: off, on, auto
    seed: int = 0
    precision: str | None = None  # backends that set the precision themselves (openvino); None: theirs


BACKENDS: Registry[Callable[[BackendOptions], Backend]] = Registry("bench backend")

# Backends that set the precision themselves, with the one they run by default; every other backend
# runs the precision of the file it times.
PRECISION_DEFAULTS = {"openvino": "f32"}


def run_precision(backend: str, precision: str | None) -> str | None:
    """The precision `backend` runs at when `precision` is asked (None: its default); None for a
    backend that runs its file's own, which refuses a precision asked of it."""
    if backend not in PRECISION_DEFAULTS:
        if precision is not None:
            raise ConfigError(f"precision is set by backend {', '.join(PRECISION_DEFAULTS)} only; backend {backend} "
                              "runs the precision of the file it times (export an INT8 or FP16 file for it)")
        return None
    return precision or PRECISION_DEFAULTS[backend]


GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def random_batch(batch: int, input_size: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *input_size), dtype=np.float32)


class OrtBackend:
    """onnxruntime with one execution provider; sequential execution, pinned intra-op threads."""

    def __init__(self, name: str, providers: tuple[str, ...], options: BackendOptions, on_gpu: bool):
        import onnxruntime as ort
        if options.graph_optimization not in GRAPH_LEVELS:
            raise ConfigError(f"unknown graph optimisation level {options.graph_optimization!r}; "
                              f"choose one of: {', '.join(GRAPH_LEVELS)}")
        provider = providers[0]
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"backend {name} needs onnxruntime's {provider}, which this onnxruntime "
                f"{ort.__version__} lacks (install onnxruntime-gpu on a machine with an NVIDIA GPU)")
        self.name, self.provider, self.providers = name, provider, list(providers)
        self.options, self.on_gpu = options, on_gpu

    def _session_options(self):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.graph_optimization]
        return so

    def load(self, model: BenchModel) -> Loaded:
        import onnxruntime as ort
        model.refuse_engine(self.name)
        path = model.onnx(self.options.onnx_optimize)
        session = ort.InferenceSession(str(path), self._session_options(), providers=self.providers)
        if session.get_providers()[0] != self.provider:
            # onnxruntime silently falls back to CPU when the device cannot be used.
            raise BackendUnavailableError(f"backend {self.name}: onnxruntime could not start "
                                          f"{self.provider} (no usable GPU?)")
        input_name = session.get_inputs()[0].name

        def bind(batch: int) -> Runner:
            x = random_batch(batch, model.input_size, self.options.seed)
            if not self.on_gpu:
                return lambda: session.run(None, {input_name: x})
            # Inputs and outputs stay on the GPU so host copies are not timed.
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            for out in session.get_outputs():
                binding.bind_output(out.name, "cuda", 0)
            return lambda: session.run_with_iobinding(binding)
        return bind

    def settings(self) -> dict:
        return {"backend": self.name, "provider": self.provider, "threads": self.options.threads,
                "inter_op_threads": 1, "execution_mode": "sequential",
                "graph_optimization": self.options.graph_optimization,
                "onnx_optimize": self.options.onnx_optimize}


def _pytorch_module(model: BenchModel, backend: str, threads: int, for_files: str) -> torch.nn.Module:
    """The model's module in eval mode, torch's threads pinned; engine and ONNX files are refused
    (naming `for_files`, the backend that times such files)."""
    model.refuse_engine(backend)
    if model.module is None:
        raise ConfigError(f"{model.label}: the {backend} backend needs a model (artifact directory, "
                          f"preset or timm name), not an ONNX file; use --backend {for_files}")
    torch.set_num_threads(threads)
    return model.module.eval()


class TorchBackend:
    """PyTorch eager on CPU under `inference_mode`, with `torch.set_num_threads` pinned."""

    name, on_gpu = "torch", False

    def __init__(self, options: BackendOptions):
        self.options = options

    def load(self, model: BenchModel) -> Loaded:
        module = _pytorch_module(model, self.name, self.options.threads, "ort-cpu")

        def bind(batch: int) -> Runner:
            x = torch.from_numpy(random_batch(batch, model.input_size, self.options.seed))

            def run() -> torch.Tensor:
                with torch.inference_mode():
                    return module(x)
            return run
        return bind

    def settings(self) -> dict:
        return {"backend": self.name, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()}


def _graphed(module: torch.nn.Module, x: torch.Tensor, warmup: int = 3) -> Runner:
    """One forward pass on the fixed input `x`, captured as a CUDA graph; the runner replays it.

    The PyTorch whole-network recipe: warm up on a side stream (lazy cuBLAS/cuDNN set-up and
    allocations cannot happen during capture), then capture on that same stream.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(warmup):
            module(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, stream=side):
        output = module(x)

    def run() -> torch.Tensor:
        graph.replay()
        torch.cuda.synchronize()
        return output
    return run


def _eager(module: torch.nn.Module, x: torch.Tensor) -> Runner:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            output = module(x)
        torch.cuda.synchronize()
        return output
    return run


class TorchCudaBackend:
    """PyTorch on one CUDA GPU, FP32 or FP16, each batch size captured once as a CUDA graph so
    small batches are not bound by kernel launches; eager where a model cannot be captured."""

    on_gpu = True

    def __init__(self, name: str, dtype: torch.dtype, options: BackendOptions):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"backend {name}: no CUDA GPU is available to this torch {torch.__version__}; "
                "use --backend torch (CPU) here, or run on a machine with an NVIDIA GPU")
        self.name, self.dtype, self.options = name, dtype, options
        self.eager_fallbacks: list[str] = []  # "label, batch N: reason" where capture failed

    def load(self, model: BenchModel) -> Loaded:
        module = copy.deepcopy(_pytorch_module(model, self.name, self.options.threads, "ort-cuda")).to(
            "cuda", self.dtype)

        def bind(batch: int) -> Runner:
            x = random_batch(batch, model.input_size, self.options.seed)
            x = torch.from_numpy(x).to("cuda", self.dtype)
            try:
                return _graphed(module, x)
            except RuntimeError as e:  # an op that cannot be captured; torch raises RuntimeError
                self.eager_fallbacks.append(f"{model.label}, batch {batch}: {str(e).splitlines()[0]}")
                return _eager(module, x)
        return bind

    def settings(self) -> dict:
        return {"backend": self.name, "device": torch.cuda.get_device_name(),
                "precision": "fp16" if self.dtype == torch.float16 else "fp32",
                "cuda_graphs": not self.eager_fallbacks, "eager_fallbacks": list(self.eager_fallbacks),
                "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                "threads": torch.get_num_threads(), "torch": torch.__version__}


BACKENDS.register("ort-cpu")(
    lambda o: OrtBackend("ort-cpu", ("CPUExecutionProvider",), o, on_gpu=False))
BACKENDS.register("ort-cuda")(
    lambda o: OrtBackend("ort-cuda", ("CUDAExecutionProvider",), o, on_gpu=True))
# TensorRT through onnxruntime's TensorRT provider: the engine is built from the same ONNX file,
# and any node TensorRT cannot take falls back to CUDA. Engine files go to tensorrt-engine instead.
BACKENDS.register("tensorrt")(
    lambda o: OrtBackend("tensorrt", ("TensorrtExecutionProvider", "CUDAExecutionProvider"), o,
                         on_gpu=True))
BACKENDS.register("torch")(TorchBackend)
BACKENDS.register("torch-cuda")(lambda o: TorchCudaBackend("torch-cuda", torch.float32, o))
BACKENDS.register("torch-cuda-fp16")(lambda o: TorchCudaBackend("torch-cuda-fp16", torch.float16, o))


def make_backend(name: str, options: BackendOptions) -> Backend:
    """The backend `name`; those that run exported files come with `vitcompact.export`."""
    if name not in BACKENDS:
        plugins.load()
    return BACKENDS.get(name)(options)


def check_backend(name: str) -> None:
    """Refuse an unknown backend name, listing the known ones (nothing is started)."""
    if name not in BACKENDS:
        plugins.load()
    BACKENDS.get(name)


def backend_names() -> list[str]:
    """Every backend, those `vitcompact.export` adds included."""
    plugins.load()
    return BACKENDS.names()
