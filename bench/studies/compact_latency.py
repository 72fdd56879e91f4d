"""Issue 3's speed evidence (a benchmark, not a test): PyTorch-eager latency of the compact model.

Builds dense vit_small_patch16_224 and its compact version with 2 of 6 heads and 30 % of neurons
removed per block, times both interleaved with pinned threads at batch 1 and 8, and prints the
measured latency ratio beside the ideal MACs ratio.

    .venv/bin/PYTHONPATH=bench python -m studies.compact_latency [--threads 1] [--round-to 16]
"""

from __future__ import annotations

import argparse

from vitcompact.bench import BenchConfig, benchmark
from .cases import RESEARCH, compact_model, dense_model, describe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--time-budget", type=float, default=25.0, help="seconds per batch size")
    # PyTorch's CPU matmuls run an MLP width of 1075 markedly slower than 1088 (a multiple of 16).
    p.add_argument("--round-to", type=int, default=1, help="align kept MLP widths to this multiple")
    args = p.parse_args(argv)
    dense = dense_model(args.model)
    compact = compact_model(dense, RESEARCH, args.round_to)
    result = benchmark(dense, compact, BenchConfig(backend="torch", batch_sizes=(1, 8), threads=args.threads,
                                                   rounds=args.rounds, runs_per_round=2, min_rounds=5,
                                                   time_budget_s=args.time_budget))
    print(f"{args.model}: dense {describe(dense)} vs compact {describe(compact)}; PyTorch eager, "
          f"{result.environment['threads']} thread(s), torch {result.environment['torch']}")
    for b in result.batches:
        s = b.speedup
        print(f"batch {b.batch_size}: dense {b.dense.p50:.2f} ms, compact {b.compact.p50:.2f} ms, "
              f"latency ratio {s.value:.3f}x [95% CI {s.low:.3f}, {s.high:.3f}], "
              f"ideal (MACs) {b.ideal_speedup:.3f}x, measured/ideal {b.efficiency:.3f}")


if __name__ == "__main__":
    main()
