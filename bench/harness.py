"""`benchmark(dense, compact, BenchConfig)`: dense vs compact latency, interleaved, in one process.

Per batch size: both models are timed by the core's one timing loop (`vitcompact.latency.timing`:
warm-up, then rounds A B A B ..., each round running the dense model `runs_per_round` times, then
the compact model as often), so drift of a shared machine hits both sides alike. The order
actually run is recorded in the result.

Backend `auto` (`auto.py`) first makes `vitcompact deploy`'s measured choice of runtime and precision
for the compact model, then times the pair the chosen way; the table of candidates goes into the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from vitcompact.data import DataBundle
from vitcompact.errors import ConfigError
from vitcompact.latency.backends import BackendOptions, Runner, make_backend, run_precision
from vitcompact.latency.environment import check_threads, environment, physical_cores
from vitcompact.latency.sources import BenchModel, check_pair, ideal_speedup
from vitcompact.latency.stats import LatencyStats, SpeedUp, latency_stats, speedup_interval
from vitcompact.latency.timing import measure_pair
from vitcompact.validate import finite, in_range, integer, seed

from .auto import AUTO, auto_choice, deploy_config
from .sources import ModelSource, resolve

SCHEMA = "vitcompact.bench/1"
CPU_BATCH_SIZES = (1, 8, 32)
GPU_BATCH_SIZES = (1, 8, 32, 64, 128, 256)
ONNX_OPTIMIZE = ("off", "on", "auto")  # the exporter's modes; "auto" may treat the two models differently


# The exporter's verification limit; a larger input batch is an allocation, not a measurement.
MAX_BATCH = 4096


@dataclass
class BenchConfig:
    """How `benchmark` times: backend, batch sweep, threads, warm-up, rounds and their budget."""

    backend: str = "ort-cpu"                    # or "auto": the measured choice of runtime and precision
    batch_sizes: tuple[int, ...] | None = None  # None: 1, 8, 32 on CPU; up to 256 on GPU
    threads: int | None = None                  # None: every physical core available
    warmup: int = 3                             # untimed runs per model and batch size
    rounds: int = 20
    runs_per_round: int = 3
    min_rounds: int = 5
    time_budget_s: float | None = 60.0          # per batch size, both models together
    confidence: float = 0.95
    graph_optimization: str = "all"             # onnxruntime: disable, basic, extended, all
    onnx_optimize: str = "off"                  # exporter's transformer fusion for both models
    seed: int = 0                               # input batch and bootstrap
    precision: str | None = None                # openvino: f32, bf16, int8 (default f32); others run the file's
    max_accuracy_drop: float | None = 1.0       # auto: validation top-1 points a candidate may lose; None: any

    def __post_init__(self) -> None:
        if self.batch_sizes is not None and not self.batch_sizes:
            raise ConfigError("batch sizes must not be empty")
        for i, b in enumerate(self.batch_sizes or ()):
            integer(f"batch sizes[{i}]", b, 1, MAX_BATCH)
        for name in ("rounds", "runs_per_round", "min_rounds"):
            integer(name, getattr(self, name), 1)
        integer("warmup", self.warmup, 0)
        if self.threads is not None:
            check_threads(self.threads)
        seed("seed", self.seed)
        if self.onnx_optimize not in ONNX_OPTIMIZE:
            raise ConfigError(f"onnx_optimize must be one of {', '.join(ONNX_OPTIMIZE)}, "
                              f"got {self.onnx_optimize!r}")
        in_range("confidence", self.confidence, 0.0, 1.0, low_open=True, high_open=True)
        if self.time_budget_s is not None:
            in_range("time_budget_s", self.time_budget_s, 0.0, low_open=True)
        if self.max_accuracy_drop is not None and finite("max_accuracy_drop", self.max_accuracy_drop) < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop}")
        if self.precision is not None and self.backend == AUTO:
            raise ConfigError("backend auto chooses the precision by measuring each one; drop precision, or "
                              "time one precision with backend openvino")
        if self.backend != AUTO:
            run_precision(self.backend, self.precision)  # a precision only where the backend sets one


@dataclass
class BatchResult:
    batch_size: int
    dense: LatencyStats
    compact: LatencyStats
    speedup: SpeedUp                 # measured: dense p50 / compact p50, with its interval
    ideal_speedup: float | None      # dense MACs / compact MACs
    rounds: int
    dense_ms: list[list[float]] = field(repr=False)    # [round][run]
    compact_ms: list[list[float]] = field(repr=False)

    @property
    def efficiency(self) -> float | None:
        """Measured speed-up as a fraction of the ideal one."""
        return None if self.ideal_speedup is None else self.speedup.value / self.ideal_speedup

    def to_dict(self) -> dict:
        d = asdict(self)
        d["efficiency"] = self.efficiency
        return d


@dataclass
class BenchResult:
    config: BenchConfig
    dense: BenchModel
    compact: BenchModel
    batches: list[BatchResult]
    environment: dict
    order: list[tuple[str, int]]  # ("dense" | "compact", batch size) of every timed round half
    schema: str = SCHEMA
    auto: dict[str, Any] | None = None  # backend auto: the chosen candidate and the table of all of them

    def to_dict(self) -> dict:
        config = {**asdict(self.config), "batch_sizes": list(self.config.batch_sizes or ())}
        return {"schema": self.schema, "config": config,
                "dense": self.dense.to_dict(), "compact": self.compact.to_dict(),
                "ideal_speedup": ideal_speedup(self.dense, self.compact),
                "batches": [b.to_dict() for b in self.batches],
                "environment": self.environment, "order": [list(o) for o in self.order],
                **({"auto": self.auto} if self.auto is not None else {})}


def _flat(rounds: list[list[float]]) -> list[float]:
    return [t for r in rounds for t in r]


def summarise(batch: int, dense_ms: list[list[float]], compact_ms: list[list[float]],
              ideal: float | None, config: BenchConfig) -> BatchResult:
    return BatchResult(batch, latency_stats(_flat(dense_ms), batch), latency_stats(_flat(compact_ms), batch),
                       speedup_interval(dense_ms, compact_ms, config.confidence, seed=config.seed),
                       ideal, len(dense_ms), dense_ms, compact_ms)


def _sweep(runners: Callable[[int], tuple[Runner, Runner]], batch_sizes: tuple[int, ...], ideal: float | None,
           config: BenchConfig, progress: Callable[[str], None] | None,
           order: list[tuple[str, int]]) -> list[BatchResult]:
    """Dense and compact (`runners(batch)`) timed as a pair at each batch size, in turn."""
    batches = []
    for batch in batch_sizes:
        dense_ms, compact_ms = measure_pair(*runners(batch), batch, config, order)
        result = summarise(batch, dense_ms, compact_ms, ideal, config)
        batches.append(result)
        if progress:
            progress(f"batch {batch}: dense {result.dense.p50:.2f} ms, compact "
                     f"{result.compact.p50:.2f} ms, speed-up {result.speedup.value:.3f}x "
                     f"(ideal {'n/a' if ideal is None else f'{ideal:.3f}x'})")
    return batches


def benchmark(dense: ModelSource, compact: ModelSource, config: BenchConfig | None = None,
              progress: Callable[[str], None] | None = None, data: DataBundle | None = None) -> BenchResult:
    """Time `dense` and `compact` (modules, artifact dirs, names or .onnx files) on one backend.

    onnxruntime backends export modules to ONNX in a temporary folder. `progress`, if given,
    receives one line per batch size as it completes. `data` is for backend auto only
    (`benchmark_auto`).
    """
    config = config or BenchConfig()
    if config.backend == AUTO:
        return benchmark_auto(dense, compact, config, data, progress)
    if data is not None:
        raise ConfigError(f"data is for backend auto, which measures accuracy; backend {config.backend} times "
                          "random inputs")
    threads = config.threads or physical_cores()
    backend = make_backend(config.backend, BackendOptions(threads, config.graph_optimization,
                                                             config.onnx_optimize, config.seed, config.precision))
    dense_model, compact_model = resolve(dense), resolve(compact)
    check_pair(dense_model, compact_model)
    batch_sizes = tuple(config.batch_sizes or (GPU_BATCH_SIZES if backend.on_gpu else CPU_BATCH_SIZES))
    order: list[tuple[str, int]] = []
    torch_threads = torch.get_num_threads()  # the torch backend pins threads process-wide
    try:
        dense_loaded, compact_loaded = backend.load(dense_model), backend.load(compact_model)
        batches = _sweep(lambda b: (dense_loaded(b), compact_loaded(b)), batch_sizes,
                         ideal_speedup(dense_model, compact_model), config, progress, order)
        settings = backend.settings()
    finally:
        torch.set_num_threads(torch_threads)
    resolved = BenchConfig(**{**asdict(config), "batch_sizes": batch_sizes, "threads": threads})
    return BenchResult(resolved, dense_model, compact_model, batches,
                       environment(settings), order)


def benchmark_auto(dense: ModelSource, compact: ModelSource, config: BenchConfig, data: DataBundle | None,
                   progress: Callable[[str], None] | None = None) -> BenchResult:
    """Backend auto: `vitcompact deploy`'s measured choice for `compact` (`auto.auto_choice`: its
    candidates timed at the bench's batch sizes and threads, validation top-1 on `data` within
    `config.max_accuracy_drop`), then dense vs compact timed the chosen way. The result's `auto`
    holds the chosen candidate and the table of all of them."""
    threads = config.threads or physical_cores()
    dense_model, compact_model = resolve(dense), resolve(compact)
    check_pair(dense_model, compact_model)
    batch_sizes = tuple(config.batch_sizes or CPU_BATCH_SIZES)
    choice_config = deploy_config(batch_sizes, threads, config.max_accuracy_drop, config.time_budget_s, config.seed)
    order: list[tuple[str, int]] = []
    with auto_choice(dense_model, compact_model, choice_config, data, progress) as auto:
        batches = _sweep(auto.runners, batch_sizes, ideal_speedup(dense_model, compact_model), config, progress,
                         order)
        settings, record, precision = auto.settings(), auto.to_dict(), auto.chosen.precision
    resolved = BenchConfig(**{**asdict(config), "batch_sizes": batch_sizes, "threads": threads})
    timed = [dataclasses.replace(m, precision=precision) for m in (dense_model, compact_model)]
    return BenchResult(resolved, *timed, batches, environment(settings), order, auto=record)
