"""The `tensorrt-engine` latency backend: native TensorRT on the engine files `vitcompact export
tensorrt` writes (the files a user ships), registered in the core's backends when the export package
is imported."""

from __future__ import annotations

import torch

from vitcompact.errors import ArtifactError, BackendUnavailableError, ConfigError
from vitcompact.latency.backends import BACKENDS, BackendOptions, Loaded, Runner, random_batch
from vitcompact.latency.sources import BenchModel

from . import tensorrt as trt  # read at call time: tests stand in for TensorRT there


class TensorRTEngineBackend:
    """Native TensorRT on engine files built by `vitcompact export tensorrt` (the files a user ships),
    run by EngineRunner with input and output on the GPU; each run synchronises before it returns."""

    name, on_gpu = "tensorrt-engine", True

    def __init__(self, options: BackendOptions):
        try:
            self.tensorrt = trt.require_tensorrt()
        except BackendUnavailableError as e:
            raise BackendUnavailableError(f"backend {self.name}: {e}") from None
        self.options = options

    def load(self, model: BenchModel) -> Loaded:
        if model.engine_path is None:
            raise ConfigError(f"{model.label}: backend {self.name} times TensorRT engine files (.engine, "
                              ".plan) built by `vitcompact export tensorrt`; give one for both models, or "
                              "use --backend tensorrt (onnxruntime's TensorRT provider) for other models")
        runner = trt.EngineRunner(model.engine_path)
        if runner.image_shape != tuple(model.input_size):
            raise ArtifactError(f"{model.engine_path} takes images {list(runner.image_shape)} but "
                                f"{trt.info_path(model.engine_path).name} says {list(model.input_size)}; build "
                                "the engine again with `vitcompact export tensorrt`")
        low, high = runner.batch_range

        def bind(batch: int) -> Runner:
            if not low <= batch <= high:
                raise ConfigError(f"{model.label} was built for batches {low}..{high}, not {batch}; pass "
                                  "--batch-sizes within that range, or build the engine again with a "
                                  "profile that covers it (--min-batch, --max-batch)")
            x = torch.from_numpy(random_batch(batch, model.input_size, self.options.seed))
            x = x.to("cuda", runner.input_dtype)

            def run() -> torch.Tensor:
                output = runner(x)
                torch.cuda.synchronize()
                return output
            return run
        return bind

    def settings(self) -> dict:
        return {"backend": self.name, "runtime": "native TensorRT", "tensorrt": self.tensorrt.__version__,
                "device": torch.cuda.get_device_name(), "threads": self.options.threads}


BACKENDS.register("tensorrt-engine")(TensorRTEngineBackend)
