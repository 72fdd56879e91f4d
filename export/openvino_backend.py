"""The `openvino` latency backend: OpenVINO's CPU runtime on the model's ONNX file, converted on load,
at f32, bf16 or INT8, with threads, streams and the latency hint set explicitly.

Each batch size gets its own compiled model with a static input shape (OpenVINO's advice for a
fixed batch; what a deployment at that batch runs). The settings the compiled model reports back,
not the ones asked for, go into `settings()`; the benchmark's environment records the CPU's
instruction sets beside them (which precision wins depends on AMX, AVX-512 BF16 / VNNI and AVX2).
`load_ir` times an IR file as `vitcompact export openvino` wrote it (what `deploy` measures).

INT8 here exists to be timed: an INT8 (QDQ) ONNX file is converted as it is; an FP32 model is
quantised by NNCF on seeded random images, which sets realistic scales for timing but says nothing
of accuracy. A user's INT8 model comes from `vitcompact export openvino --precision int8`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcompact.errors import BackendUnavailableError, ConfigError
from vitcompact.latency.backends import BACKENDS, BackendOptions, Loaded, Runner, random_batch
from vitcompact.latency.sources import BenchModel
from vitcompact.validate import integer, one_of, seed

from .openvino_runtime import (FLOAT_PRECISIONS, PRECISIONS, compile_ir, convert_onnx, executed_precision,
                               float_precision, read_ir, recorded_precision, require_nncf, require_openvino)


@dataclass(frozen=True)
class OpenVINOOptions:
    """`BackendOptions` plus what OpenVINO needs: the precision and the number of streams."""

    threads: int
    precision: str = "f32"
    streams: int = 1
    int8_float_precision: str = "auto"  # an INT8 model's unquantised ops: f32, bf16, auto (native bf16)
    calibration_batches: int = 4        # random batches NNCF sees when it quantises for timing
    seed: int = 0

    def __post_init__(self) -> None:
        integer("threads", self.threads, 1)
        one_of("OpenVINO precision", self.precision, PRECISIONS)
        integer("streams", self.streams, 1)
        one_of("INT8 float precision", self.int8_float_precision, FLOAT_PRECISIONS)
        integer("calibration_batches", self.calibration_batches, 1)
        seed("seed", self.seed)

    @classmethod
    def of(cls, options: BackendOptions) -> "OpenVINOOptions":
        return cls(options.threads, options.precision or "f32", seed=options.seed)

    @property
    def inference_precision(self) -> str:
        return float_precision(self.int8_float_precision) if self.precision == "int8" else self.precision


class OpenVINOBackend:
    """OpenVINO on the CPU: one static-shape compiled model per batch size, one infer request."""

    name, on_gpu = "openvino", False

    def __init__(self, options: OpenVINOOptions | BackendOptions):
        try:
            self.openvino = require_openvino()
        except BackendUnavailableError as e:
            raise BackendUnavailableError(f"backend {self.name}: {e}") from None
        self.options = options if isinstance(options, OpenVINOOptions) else OpenVINOOptions.of(options)
        self.reported: dict[str, Any] = {}
        self.int8_from = ""

    def _model(self, model: BenchModel) -> Any:
        """The model's OpenVINO graph at the requested precision."""
        model.refuse_engine(self.name)
        if model.precision not in ("fp32", "int8"):
            raise ConfigError(f"{model.label} is a {model.precision} ONNX file; give backend {self.name} "
                              "the fp32 (or INT8) export: it sets the precision itself")
        onnx_path = model.onnx("off")  # the plain graph: onnxruntime's fused operators are its own
        if model.precision == "int8":
            if self.options.precision != "int8":
                raise ConfigError(f"{model.label} is an INT8 file; time it with precision int8")
            self.int8_from = "the INT8 (QDQ) ONNX file"
            return convert_onnx(onnx_path)
        ov_model = convert_onnx(onnx_path)
        return self._quantised(ov_model, model) if self.options.precision == "int8" else ov_model

    def _quantised(self, ov_model: Any, model: BenchModel) -> Any:
        nncf = require_nncf()
        batches = [random_batch(8, model.input_size, self.options.seed + i)
                   for i in range(self.options.calibration_batches)]
        self.int8_from = f"NNCF on {8 * len(batches)} random images (for timing, not accuracy)"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(ov_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                 preset=nncf.QuantizationPreset.MIXED, subset_size=len(batches))

    def load(self, model: BenchModel) -> Loaded:
        return self._bind(self._model(model), model.input_size, self.options.inference_precision)

    def load_ir(self, path: Path) -> Loaded:
        """An IR file as written by `to_openvino`, timed as it is, at the inference precision it records
        (`options.precision` does not apply)."""
        ir = read_ir(path)
        input_size = tuple(int(d) for d in ir.inputs[0].get_partial_shape()[1:].to_shape())
        return self._bind(ir, input_size, recorded_precision(ir))

    def _bind(self, ov_model: Any, input_size: tuple[int, ...], precision: str) -> Loaded:
        def bind(batch: int) -> Runner:
            compiled = compile_ir(ov_model, precision, self.options.threads, self.options.streams, batch)
            self._report(compiled)
            request = compiled.create_infer_request()
            x = random_batch(batch, input_size, self.options.seed)
            return lambda: request.infer({0: x}, share_inputs=True)
        return bind

    def _report(self, compiled: Any) -> None:
        self.reported = {"inference_precision": executed_precision(compiled),
                         "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                         "streams": int(compiled.get_property("NUM_STREAMS")),
                         "performance_hint": str(compiled.get_property("PERFORMANCE_HINT"))}

    def settings(self) -> dict:
        return {"backend": self.name, "runtime": "OpenVINO", "openvino": self.openvino.__version__,
                "device": "CPU", "precision": self.options.precision,
                "requested": {"inference_precision": self.options.inference_precision,
                              "threads": self.options.threads, "streams": self.options.streams,
                              "performance_hint": "LATENCY"},
                **self.reported, "int8_from": self.int8_from or None, "shapes": "static per batch size"}


BACKENDS.register("openvino")(OpenVINOBackend)
