"""ONNX opset against onnxruntime CPU speed: the same dense model exported at two opsets, timed
interleaved in one run (a benchmark, not a test).

Run: python -m vitcompact.bench.opset_speed [--opsets 18,20] [--cases vit_small_patch16_224:8,vit-cifar-tiny:1]

Opset 20 spells GELU as one operator, which onnxruntime fuses with the preceding bias (BiasGelu);
at opset 18 it is five. This is why `ExportConfig.opset` defaults to 20.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

from vitcompact.export import ExportConfig, to_onnx

from .cases import dense_model
from .harness import BenchConfig, benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--opsets", default="18,20", help="two opsets: the first is the reference")
    p.add_argument("--cases", default="vit_small_patch16_224:8,vit-cifar-tiny:8,vit-cifar-tiny:1",
                   help="model:batch pairs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0, help="timing budget per pair")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    base, other = (int(o) for o in args.opsets.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="opset-") as tmp:
        for case in args.cases.split(","):
            name, batch = case.rsplit(":", 1)
            dense = dense_model(name)
            with contextlib.redirect_stdout(io.StringIO()):
                paths = [to_onnx(dense, Path(tmp) / f"{name}-{o}.onnx", ExportConfig(optimize="off", opset=o)).path
                         for o in (base, other)]
            b = benchmark(*paths, BenchConfig(batch_sizes=(int(batch),), threads=args.threads, rounds=20,
                                              runs_per_round=1, time_budget_s=args.seconds)).batches[0]
            rows.append({"model": name, "batch": int(batch), f"opset{base}_ms": b.dense.p50,
                         f"opset{other}_ms": b.compact.p50, "speedup": b.speedup.value})
            print(f"{name} batch {batch}: opset {base} {b.dense.p50:.2f} ms, opset {other} {b.compact.p50:.2f} ms, "
                  f"{b.speedup.value:.3f}x [{b.speedup.low:.3f}, {b.speedup.high:.3f}]", flush=True)
    return rows


if __name__ == "__main__":
    main()
