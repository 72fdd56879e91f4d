"""Latency of dense vs compact models (installed as `vitcompact.bench`).

    result = benchmark(dense, compact, BenchConfig(backend="ort-cpu", batch_sizes=(1, 8)))
    paths = write_report(result, "runs/bench")   # bench.json, bench.md, bench.png

The backends, the timing loop and the statistics live in the core (`vitcompact.latency`); this
package compares models from files and names and writes the reports. The research studies that
regenerate `docs/` are scripts under `bench/studies/`, outside the installed package.
"""

from vitcompact.latency import (BACKENDS, BackendOptions, BenchModel, LatencyStats, SpeedUp, latency_stats,
                                speedup_interval)

from .harness import SCHEMA, BatchResult, BenchConfig, BenchResult, benchmark
from .report import plot, to_markdown, write_report
from .sources import resolve, with_token_merge

__all__ = [
    "BACKENDS", "BackendOptions", "SCHEMA", "BatchResult", "BenchConfig", "BenchResult", "benchmark",
    "plot", "to_markdown", "write_report", "BenchModel", "resolve", "LatencyStats", "SpeedUp",
    "latency_stats", "speedup_interval", "with_token_merge",
]
