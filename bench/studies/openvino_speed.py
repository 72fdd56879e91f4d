"""Issue 27's speed evidence (a benchmark, not a test): onnxruntime FP32 against OpenVINO f32 / bf16 / INT8.

Builds dense vit_small_patch16_224 (random weights) and its compact version (a third of the heads and
30 % of the neurons removed per block, MLP widths rounded to 16), and times, in one interleaved run
per batch size (the core's timing loop over every entry, A B C ... per round), each model on
onnxruntime FP32 and on OpenVINO at f32, bf16 and INT8 (NNCF on random images: for timing only), plus
the compact INT8 model with its unquantised ops in f32. Prints the speed-up of each entry over the
dense model on onnxruntime FP32 and the compact-over-dense speed-up at each OpenVINO precision, with
the CPU's instruction sets; `--out` writes openvino_speed.json and openvino_speed.md.

    PYTHONPATH=bench .venv/bin/python -m studies.openvino_speed [--threads 1] [--out docs/openvino]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from vitcompact.export.openvino_backend import OpenVINOBackend, OpenVINOOptions
from vitcompact.io import ensure_dir, write_json, write_text
from vitcompact.latency import BackendOptions, BenchModel, environment, make_backend
from vitcompact.latency.timing import Timing, measure_rounds

from .cases import RESEARCH, compact_model, dense_model, describe

SCHEMA = "vitcompact.openvino_speed/1"
PRECISIONS = ("f32", "bf16", "int8")


def entries(dense: BenchModel, compact: BenchModel, threads: int) -> dict[str, tuple[object, BenchModel]]:
    """Name -> (backend, model) of every timed entry."""
    out = {}
    for kind, model in (("dense", dense), ("compact", compact)):
        out[f"{kind} ort fp32"] = (make_backend("ort-cpu", BackendOptions(threads)), model)
        for precision in PRECISIONS:
            out[f"{kind} ov {precision}"] = (make_backend("openvino", BackendOptions(threads, precision=precision)),
                                             model)
    out["compact ov int8 (f32 rest)"] = (OpenVINOBackend(OpenVINOOptions(threads, "int8", int8_float_precision="f32")),
                                         compact)
    return out


def measure(loaded: dict, batch: int, timing: Timing) -> dict[str, float]:
    """Median ms of every entry at `batch`, all timed in the same interleaved rounds."""
    names = list(loaded)
    times = measure_rounds([loaded[name](batch) for name in names], timing)
    return {name: statistics.median(t for r in rounds for t in r) for name, rounds in zip(names, times)}


def to_markdown(report: dict) -> str:
    cpu = report["environment"]["cpu_features"]
    lines = [f"# OpenVINO against onnxruntime: {report['model']}", "",
             f"CPU {cpu['model']} ({cpu['best_isa']}; AMX {cpu['amx']}, AVX-512 BF16 {cpu['avx512_bf16']}, "
             f"AVX-512 VNNI {cpu['avx512_vnni']}), {report['threads']} thread(s); dense {report['dense']}, compact "
             f"{report['compact']} (MACs ratio {report['ideal_speedup']:.3f}).", "",
             "| entry | " + " | ".join(f"batch {b} ms | vs dense ORT FP32" for b in report["batches"]) + " |",
             "|---|" + "---:|---:|" * len(report["batches"])]
    for name in report["batches"][str(report["batch_sizes"][0])]["ms"]:
        cells = [f"{r['ms'][name]:.2f} | {r['speedup'][name]:.2f}x" for r in report["batches"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Compact over dense at the same OpenVINO precision:", ""]
    for batch, r in report["batches"].items():
        lines.append(f"- batch {batch}: " + ", ".join(f"{p} {r['compact_over_dense'][p]:.2f}x" for p in PRECISIONS))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", default="8,1")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per batch size, at most")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds per batch size, every entry together")
    p.add_argument("--out", type=Path, default=None, help="write openvino_speed.json and .md here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense_module = dense_model(args.model)
    compact_module = compact_model(dense_module, RESEARCH, round_to=16)
    dense, compact = BenchModel.of(dense_module, "dense"), BenchModel.of(compact_module, "compact")
    table = entries(dense, compact, args.threads)
    loaded = {name: backend.load(model) for name, (backend, model) in table.items()}
    timing = Timing(warmup=2, rounds=args.rounds, runs_per_round=1, min_rounds=3, time_budget_s=args.time_budget)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = {"schema": SCHEMA, "model": args.model, "threads": args.threads, "batch_sizes": batch_sizes,
              "dense": describe(dense_module), "compact": describe(compact_module),
              "ideal_speedup": dense.macs / compact.macs, "batches": {}}
    for batch in batch_sizes:
        ms = measure(loaded, batch, timing)
        report["batches"][str(batch)] = {
            "ms": ms, "speedup": {n: ms["dense ort fp32"] / t for n, t in ms.items()},
            "compact_over_dense": {p: ms[f"dense ov {p}"] / ms[f"compact ov {p}"] for p in PRECISIONS}}
    report["environment"] = environment(table["compact ov bf16"][0].settings())
    markdown = to_markdown(report)
    print(markdown)
    if args.out is not None:
        ensure_dir(args.out)
        write_json(args.out / "openvino_speed.json", report)
        write_text(args.out / "openvino_speed.md", markdown)


if __name__ == "__main__":
    main()
