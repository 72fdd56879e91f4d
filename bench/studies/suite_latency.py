"""Latency suite (a benchmark, not a test): measured vs ideal speed-up on onnxruntime CPU.

Two models (vit_small_patch16_224 at 224 px, vit-cifar-tiny at 32 px), each pruned at the research
configuration and at half, timed at batch 1 and 8 by `vitcompact.bench.benchmark`. Target for
vit_small_patch16_224: measured >= 0.9 x ideal at batch 1 and >= 0.95 x ideal at batch 8.

    .venv/bin/PYTHONPATH=bench python -m studies.suite_latency [--threads 1] [--out runs/suite]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vitcompact.bench import BenchConfig, benchmark, resolve, write_report
from .cases import HALF, RESEARCH, compact_model, dense_model, describe

MODELS = ("vit_small_patch16_224", "vit-cifar-tiny")
TARGETS = {"vit_small_patch16_224": {1: 0.9, 8: 0.95}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--time-budget", type=float, default=25.0, help="seconds per batch size and pair")
    p.add_argument("--round-to", type=int, default=1, help="align kept MLP widths to this multiple")
    p.add_argument("--graph-optimization", default="all", choices=("disable", "basic", "extended", "all"))
    p.add_argument("--onnx-optimize", default="off", choices=("off", "on"),
                   help="the exporter's transformer fusion, applied to dense and compact alike")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=None, help="write each pair's report under this folder")
    args = p.parse_args(argv)
    config = BenchConfig(backend="ort-cpu", batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                         threads=args.threads, rounds=args.rounds, runs_per_round=2, min_rounds=5,
                         time_budget_s=args.time_budget, graph_optimization=args.graph_optimization,
                         onnx_optimize=args.onnx_optimize)
    start = time.perf_counter()
    print(f"onnxruntime CPU, {args.threads} thread(s), graph optimisation {args.graph_optimization}, "
          f"export fusion {args.onnx_optimize}, MLP widths aligned to {args.round_to}")
    print(f"{'model':24} {'case':20} {'structure':20} {'batch':>5} {'dense ms':>9} {'compact ms':>10} "
          f"{'measured [95% CI]':>24} {'ideal':>7} {'meas/ideal':>10}  target")
    for name in args.models.split(","):
        dense = resolve(dense_model(name))  # exported once, reused by both cases
        for case in (RESEARCH, HALF):
            compact = compact_model(dense.module, case, args.round_to)
            result = benchmark(dense, compact, config)
            for b in result.batches:
                target = TARGETS.get(name, {}).get(b.batch_size)
                verdict = "" if target is None else (
                    f"{'met' if b.efficiency >= target else 'MISSED'} (>= {target})")
                s = b.speedup
                print(f"{name:24} {case.name:20} {describe(compact):20} {b.batch_size:5d} "
                      f"{b.dense.p50:9.2f} {b.compact.p50:10.2f} "
                      f"{f'{s.value:.3f}x [{s.low:.3f}, {s.high:.3f}]':>24} {b.ideal_speedup:6.3f}x "
                      f"{b.efficiency:10.3f}  {verdict}", flush=True)
            if args.out:
                write_report(result, args.out / f"{name}-{case.slug}")
    print(f"{result.environment['cpu']}, {result.environment['physical_cores']} cores; "
          f"onnxruntime {result.environment['onnxruntime']}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
