"""One export setting against onnxruntime CPU speed: the same model exported with two values of
an `ExportConfig` field, timed interleaved in one run (a benchmark, not a test).

Run: PYTHONPATH=bench python -m studies.export_speed --setting graph --values timm,token-matrix
     [--compact] [--int8 static] [--cases vit_small_patch16_224:8,vit-cifar-tiny:1]

The defaults these runs chose (README "ONNX"): opset 20 (`--setting opset --values 18,20`: GELU is
one operator, which onnxruntime fuses with the preceding bias) and the token-matrix graph.
`--compact` times the research compact model instead of the dense one; `--int8 static` times both
files after static INT8 (scope linear, calibrated on Fashion-MNIST images resized to the input).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

from vitcompact.export import ExportConfig, Int8Config, to_int8, to_onnx

from .cases import RESEARCH, calibration_data, compact_model, dense_model
from vitcompact.bench.harness import BenchConfig, benchmark
from .pareto import FASHION_ROOT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", default="graph", choices=[f.name for f in dataclasses.fields(ExportConfig)],
                   help="the ExportConfig field compared")
    p.add_argument("--values", default="timm,token-matrix", help="two values: the first is the reference")
    p.add_argument("--cases", default="vit_small_patch16_224:8,vit-cifar-tiny:8,vit-cifar-tiny:1",
                   help="model:batch pairs")
    p.add_argument("--compact", action="store_true", help="the research compact model, not the dense one")
    p.add_argument("--int8", choices=["static", "dynamic"], default=None, help="quantise both files first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0, help="timing budget per pair")
    return p.parse_args(argv)


def export_pair(name: str, args: argparse.Namespace, folder: Path) -> list[Path]:
    """The case's model exported with each of the two values (and quantised, with `--int8`)."""
    model = dense_model(name)
    model = compact_model(model, RESEARCH, 16) if args.compact else model
    kind = type(getattr(ExportConfig(), args.setting))
    data = calibration_data(model, "fashion-mnist", FASHION_ROOT, 512) if args.int8 == "static" else None
    paths = []
    for value in args.values.split(","):
        config = ExportConfig(optimize="off", **{args.setting: kind(value)})
        with contextlib.redirect_stdout(io.StringIO()):
            path = to_onnx(model, folder / f"{name}-{value}.onnx", config).path
            if args.int8:
                path = to_int8(path, config=Int8Config(mode=args.int8, max_accuracy_drop=None), data=data,
                               verify=False).path
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    base, other = args.values.split(",")
    what = ("compact" if args.compact else "dense") + (f" {args.int8} INT8" if args.int8 else " FP32")
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        for case in args.cases.split(","):
            name, batch = case.rsplit(":", 1)
            paths = export_pair(name, args, Path(tmp))
            b = benchmark(*paths, BenchConfig(batch_sizes=(int(batch),), threads=args.threads, rounds=20,
                                              runs_per_round=1, time_budget_s=args.seconds)).batches[0]
            rows.append({"model": name, "batch": int(batch), "kind": what, f"{base}_ms": b.dense.p50,
                         f"{other}_ms": b.compact.p50, "speedup": b.speedup.value})
            print(f"{name} {what} batch {batch}: {args.setting} {base} {b.dense.p50:.2f} ms, {other} "
                  f"{b.compact.p50:.2f} ms, {b.speedup.value:.3f}x [{b.speedup.low:.3f}, {b.speedup.high:.3f}]",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
