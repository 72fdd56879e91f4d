"""`OpenVINOConfig`: how `to_openvino` builds and checks an OpenVINO IR."""

from __future__ import annotations

from dataclasses import dataclass

from vitcompact.errors import ConfigError
from vitcompact.latency.timing import Timing
from vitcompact.validate import finite, flag, in_range, integer, one_of

from .openvino_runtime import FLOAT_PRECISIONS, PRECISIONS, float_precision
from .verify import DEFAULT_ATOL, DEFAULT_BATCHES

INT8_SOURCES = ("auto", "nncf", "qdq")
PRESETS = ("mixed", "performance")  # NNCF: mixed = asymmetric activations, the transformer default
# The spelling of the metadata's `precision` key, shared with the ONNX files.
METADATA_PRECISION = {"f32": "fp32", "bf16": "bf16", "int8": "int8"}
# Largest logit difference allowed, as a fraction of the largest reference logit: a sanity bound,
# the accuracy guard is the real check. Measured (AVX-512 BF16 CPU): bf16 1.2 % on a trained vit-digits,
# 0.9 % on a random vit_small; INT8 2.6 % on the trained vit-digits, 18 % on the random vit_small
# calibrated on 4 noise images.
LOGITS_RTOL = {"bf16": 0.05, "int8": 0.25}
# How int8_source="auto" times each INT8 IR: a few runs, the two re-timed interleaved by `choose`.
INT8_PICK_TIMING = Timing(warmup=2, rounds=5, runs_per_round=1, min_rounds=5, time_budget_s=None)


@dataclass
class OpenVINOConfig:
    """How `to_openvino` builds and checks the IR. `max_accuracy_drop` is in points of validation
    top-1, as for ONNX INT8; `None` measures without refusing."""

    precision: str = "f32"
    int8_source: str = "auto"        # nncf, qdq (vitcompact's static QDQ ONNX, converted), auto: faster
    preset: str = "mixed"            # NNCF quantisation preset
    int8_float_precision: str = "auto"  # INT8's unquantised ops (LayerNorm, softmax, ...): f32, bf16, auto
    calibration_images: int = 300    # training images NNCF / the QDQ calibrator see
    max_accuracy_drop: float | None = 1.0
    atol: float = DEFAULT_ATOL       # f32: max abs logit difference against the reference
    logits_rtol: float | None = None  # bf16 / INT8: max abs difference / largest reference logit
    min_top1_agreement: float = 0.9   # bf16 / INT8: share of images whose top-1 matches the reference
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES  # f32 parity batches (normal noise)
    choice_batch: int = 8            # the batch at which int8_source="auto" times the two IRs
    threads: int | None = None       # OpenVINO's threads for the checks and timings; None: its default
    verify: bool = True

    def __post_init__(self) -> None:
        one_of("OpenVINO precision", self.precision, PRECISIONS)
        one_of("INT8 source", self.int8_source, INT8_SOURCES)
        one_of("NNCF preset", self.preset, PRESETS)
        one_of("INT8 float precision", self.int8_float_precision, FLOAT_PRECISIONS)
        integer("calibration_images", self.calibration_images, 1)
        if self.max_accuracy_drop is not None and finite("max_accuracy_drop", self.max_accuracy_drop) < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop}")
        in_range("atol", self.atol, 0.0, low_open=True)
        if self.logits_rtol is not None:
            in_range("logits_rtol", self.logits_rtol, 0.0, low_open=True)
        in_range("min_top1_agreement", self.min_top1_agreement, 0.0, 1.0)
        if not self.batch_sizes:
            raise ConfigError("verification batch sizes must not be empty")
        for b in self.batch_sizes:
            integer("verification batch size", b, 1)
        integer("choice_batch", self.choice_batch, 1)
        if self.threads is not None:
            integer("threads", self.threads, 1)
        flag("verify", self.verify)

    @property
    def inference_precision(self) -> str:
        """What the runtime is told for floating-point ops."""
        return float_precision(self.int8_float_precision) if self.precision == "int8" else self.precision

    @property
    def rtol(self) -> float:
        return self.logits_rtol if self.logits_rtol is not None else LOGITS_RTOL[self.precision]
