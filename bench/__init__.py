"""Latency of dense vs compact models (installed as `vitcompact.bench`).

    result = benchmark(dense, compact, BenchConfig(backend="ort-cpu", batch_sizes=(1, 8)))
    paths = write_report(result, "runs/bench")   # bench.json, bench.md, bench.png
"""

from .backends import BACKENDS, BackendOptions
from .harness import SCHEMA, BatchResult, BenchConfig, BenchResult, benchmark
from .report import plot, to_markdown, write_report
from .sources import BenchModel, resolve
from .stats import LatencyStats, SpeedUp, latency_stats, speedup_interval

__all__ = [
    "BACKENDS", "BackendOptions", "SCHEMA", "BatchResult", "BenchConfig", "BenchResult", "benchmark",
    "plot", "to_markdown", "write_report", "BenchModel", "resolve", "LatencyStats", "SpeedUp",
    "latency_stats", "speedup_interval",
]
