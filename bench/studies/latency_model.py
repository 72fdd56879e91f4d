"""Study: the latency table of one model, its error on random structures, and requested vs predicted
vs measured speed-ups (README "Results at a glance"; docs). The table itself is the core's
(`vitcompact.latency.table`); this script measures and prints.

    PYTHONPATH=bench .venv/bin/python -m studies.latency_model --model vit-cifar-tiny --batch 1 \
        --threads 1 --target-speedups 1.5,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch.nn as nn

import vitcompact as vc
from vitcompact.errors import VitCompactError
from vitcompact.io import write_json
from vitcompact.latency.budget import LatencyBudget
from vitcompact.latency.table import (DEFAULT_MLP_POINTS, Blocks, Interleaved, LatencyTable, Progress, TableTiming,
                                      block_shape, first_units_masks, latency_table, timing_copy, width_grid)

from .cases import dense_model


def random_structures(table: LatencyTable, count: int, round_to: int, seed: int = 0) -> list[Blocks]:
    """`count` structures with per-block head counts uniform on 0..H and widths uniform on the grid."""
    rng = np.random.default_rng(seed)
    grid = width_grid(table.hidden, round_to)
    return [[(int(rng.integers(0, table.num_heads + 1)), int(grid[rng.integers(0, len(grid))]))
             for _ in range(table.depth)] for _ in range(count)]


def validate_table(model: nn.Module, table: LatencyTable, backend: str = "ort-cpu", batch: int = 1,
                   threads: int = 1, structures: int = 10, seed: int = 0, progress: Progress | None = None,
                   timing: TableTiming | None = None) -> dict[str, Any]:
    """Predicted against measured latency of `structures` random structures, each compacted and
    timed interleaved with the dense model, and the median absolute relative error. `error` takes
    the measured latency times (table's dense ms / dense ms now), as the machine may have sped up
    or slowed down since the table was measured; `raw_error` takes it as measured."""
    block_shape(model)
    round_to = int(table.key.get("round_to", 1))
    source = timing_copy(model)
    cases = random_structures(table, structures, round_to, seed)
    with Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress) as timer:
        indices = [timer.time(vc.compact(source, first_units_masks(source, blocks)),
                              f"structure {i}, predicted {table.predict(blocks):.3f} ms")
                   for i, blocks in enumerate(cases)]
        dense_ms = timer.dense_ms
        # The machine may run faster or slower than when the table was measured: `error` compares
        # with the measured latency rescaled by the dense model's (table / now), `raw_error` without.
        drift = table.dense_ms / dense_ms
        rows = []
        for blocks, index in zip(cases, indices):
            predicted, measured = table.predict(blocks), timer.ms(index)
            rows.append({"blocks": [list(b) for b in blocks], "predicted_ms": predicted, "measured_ms": measured,
                         "error": predicted / (measured * drift) - 1.0, "raw_error": predicted / measured - 1.0})
    return {"structures": rows, "dense_ms": dense_ms, "table_dense_ms": table.dense_ms,
            "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
            "median_abs_raw_error": statistics.median(abs(r["raw_error"]) for r in rows)}


def check_speedups(model: nn.Module, table: LatencyTable, targets: Sequence[float], backend: str = "ort-cpu",
                   batch: int = 1, threads: int = 1, round_to: int = 1, seed: int = 0,
                   progress: Progress | None = None, timing: TableTiming | None = None) -> list[dict[str, Any]]:
    """For each requested speed-up: allocate with magnitude scores under `LatencyBudget(table, x)`,
    compact, and time against the dense model; requested, predicted and measured speed-ups."""
    source = timing_copy(model)
    rows = []
    with Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress) as timer:
        for target in targets:
            config = vc.RegroupConfig(budget=LatencyBudget(table, target), round_to=round_to)
            masks = vc.regroup(source, vc.PruneMasks.ones(source), config)
            blocks = masks.structure().shape()
            compact_ms, dense_ms = timer.pairs[timer.time(vc.compact(source, masks), f"{target:g}x")]
            rows.append({"requested": target, "predicted": table.reference_ms / table.predict(blocks),
                         "measured": dense_ms / compact_ms, "blocks": [list(b) for b in blocks],
                         "dense_ms": dense_ms, "compact_ms": compact_ms})
    for row in rows:
        row["error"] = row["measured"] / row["requested"] - 1.0
    return rows


def _print_table(table: LatencyTable) -> None:
    print(f"fixed {table.fixed_ms:.3f} ms, per block: base {table.base_ms:.4f} ms; dense measured "
          f"{table.dense_ms:.3f} ms, predicted {table.full_ms:.3f} ms "
          f"({table.full_ms / table.dense_ms - 1:+.1%})")
    print("heads  " + " ".join(f"{h:>8d}" for h in range(table.num_heads + 1)))
    print("ms     " + " ".join(f"{t:8.4f}" for t in table.head_ms))
    print("width  " + " ".join(f"{w:>8d}" for w in table.mlp_widths))
    print("ms     " + " ".join(f"{t:8.4f}" for t in table.mlp_ms))


def _print_validation(report: dict[str, Any]) -> None:
    print(f"{'structure':>9} {'heads':>6} {'neurons':>8} {'predicted':>10} {'measured':>9} {'error':>7} "
          f"{'raw':>7}")
    for i, row in enumerate(report["structures"]):
        heads, neurons = (sum(b[k] for b in row["blocks"]) for k in (0, 1))
        print(f"{i:9d} {heads:6d} {neurons:8d} {row['predicted_ms']:10.3f} {row['measured_ms']:9.3f} "
              f"{row['error']:+7.1%} {row['raw_error']:+7.1%}")
    print(f"median |error| {report['median_abs_error']:.1%} (target <= 5 %), "
          f"{report['median_abs_raw_error']:.1%} raw; dense {report['dense_ms']:.3f} ms now, "
          f"{report['table_dense_ms']:.3f} ms when the table was measured (error rescales by their ratio)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-cifar-tiny")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--round-to", type=int, default=1, help="MLP widths are multiples of this")
    p.add_argument("--mlp-points", type=int, default=None, help=f"MLP widths measured (default {DEFAULT_MLP_POINTS})")
    p.add_argument("--structures", type=int, default=10, help="random structures to validate the table on")
    p.add_argument("--target-speedups", type=_speedups, default=[], help="comma-separated speed-ups to allocate, e.g. 1.5,2")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $VITCOMPACT_CACHE/latency or ~/.cache")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached table fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write everything printed as JSON here")
    args = p.parse_args(argv)
    try:
        _run(args)
    except VitCompactError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _speedups(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1.5,2, got {text!r}") from None


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    model = dense_model(args.model, args.seed)
    where = f"{args.model}, {args.backend}, batch {args.batch}, {args.threads} thread(s)"
    table = latency_table(model, args.backend, args.batch, args.threads, args.round_to, args.mlp_points,
                          args.cache_dir, args.refresh, _progress)
    print(f"latency table of {where} ({time.perf_counter() - start:.0f} s)")
    _print_table(table)
    out: dict[str, Any] = {"table": table.to_dict()}
    if args.structures:
        out["validation"] = validate_table(model, table, args.backend, args.batch, args.threads, args.structures,
                                           args.seed, _progress)
        _print_validation(out["validation"])
    if args.target_speedups:
        out["speedups"] = check_speedups(model, table, args.target_speedups, args.backend, args.batch, args.threads,
                                         args.round_to, args.seed, _progress)
        print(f"{'requested':>9} {'predicted':>9} {'measured':>9} {'error':>7}  structure (heads, width)")
        for row in out["speedups"]:
            print(f"{row['requested']:8.3f}x {row['predicted']:8.3f}x {row['measured']:8.3f}x "
                  f"{row['error']:+7.1%}  {row['blocks']}")
    out["seconds"] = time.perf_counter() - start
    print(f"{out['seconds']:.0f} s; {table.key['versions']['cpu']}; onnxruntime "
          f"{table.key['versions']['onnxruntime']}; other processes on this machine add noise")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
