"""`vitcompact bench`: dense vs compact latency, measured speed-up beside the ideal one."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

import vitcompact as vc
from vitcompact.bench import (BenchConfig, BenchModel, BenchResult, benchmark, resolve, with_token_merge,
                              write_report)
from vitcompact.bench.sources import ModelSource
from vitcompact.bench.auto import AUTO, auto_module
from vitcompact.data import DATA_SOURCES, DataBundle
from vitcompact.export.deployment import table_of
from vitcompact.latency import backend_names
from vitcompact.errors import ConfigError

from .common import (DataRootOption, JsonOption, console, err_console, print_json, token_merge_config,
                     token_merge_options, user_errors)
from .options import config_options


def parse_batch_sizes(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes takes comma-separated integers like 1,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes takes positive integers like 1,8,32, got {text!r}")
    return sizes


@user_errors
@config_options(token_merge_options("the COMPACT model only (the dense one runs as it is; an .onnx or engine "
                                    "file cannot take it)"))
def bench(
    dense: str = typer.Argument(..., help="Dense model: artifact directory, preset, timm name, .onnx "
                                          "file or TensorRT .engine/.plan file."),
    compact: str = typer.Argument(..., help="Compact model: artifact directory, .onnx file or TensorRT "
                                            ".engine/.plan file (or a name)."),
    backend: str = typer.Option("ort-cpu", help=f"One of: {', '.join(backend_names())}, {AUTO}. tensorrt is "
                                "onnxruntime's TensorRT provider (models, .onnx files); tensorrt-engine "
                                "runs .engine/.plan files from `vitcompact export tensorrt` natively; openvino "
                                "runs OpenVINO on the CPU at --precision; auto chooses among onnxruntime and "
                                "OpenVINO precisions by measurement, as deploy does (needs --data)."),
    precision: str | None = typer.Option(None, help="--backend openvino: f32 (default), bf16 or int8 (INT8 "
                                                     "quantised by NNCF on random images: for timing only)."),
    batch_sizes: str | None = typer.Option(None, help="Comma-separated, e.g. 1,8,32 "
                                                       "(default 1,8,32 on CPU, up to 256 on GPU)."),
    threads: int | None = typer.Option(None, help="Threads per model (default: all physical cores)."),
    rounds: int = typer.Option(20, help="Timed rounds (A B alternations) per batch size, at most."),
    runs_per_round: int = typer.Option(3, help="Timed runs of each model per round."),
    time_budget: float = typer.Option(60.0, help="Seconds per batch size that cap the rounds."),
    out: Path | None = typer.Option(None, help="Write bench.json, bench.md and bench.png here."),
    data: str | None = typer.Option(None, "--data", help=f"--backend auto: data source whose training split "
                                    f"calibrates INT8 and whose validation split measures each candidate's "
                                    f"accuracy: {', '.join(DATA_SOURCES.names())}."),
    data_root: Path | None = DataRootOption,
    max_accuracy_drop: float | None = typer.Option(
        None, help=f"--backend auto: refuse a candidate losing more validation top-1 points than onnxruntime "
                   f"FP32 (default {BenchConfig.max_accuracy_drop:g})."),
    json_out: bool = JsonOption,
    given: dict | None = None,
) -> None:
    """Measure dense vs compact latency (interleaved, pinned threads) and compare with the ideal.

    Engine files (both sides) need --backend tensorrt-engine, the <engine>.json beside each (written by
    `vitcompact export tensorrt`: input size, MACs, precision, batch profile) and --batch-sizes inside
    the engines' profile (1..64 unless built otherwise; the GPU default sweep goes to 256).

    --token-merge R makes the compact model merge tokens before it is timed; the dense model runs as it
    is, so the measured and the ideal speed-up include the merging.

    --backend openvino (the openvino extra) sets threads, one stream and the latency hint explicitly;
    they and the CPU's instruction sets (AMX, AVX-512 VNNI / BF16, AVX2) go into bench.json.

    --backend auto makes deploy's measured choice for the compact model (onnxruntime FP32 / static INT8,
    OpenVINO f32 / bf16 / INT8 where installed; validation top-1 on --data within --max-accuracy-drop),
    then times dense vs compact the chosen way; the table of candidates goes into bench.json and bench.md.

    Example: vitcompact bench vit_small_patch16_224 runs/demo/compact --batch-sizes 1,8 --threads 1
    """
    if backend != AUTO and (data is not None or max_accuracy_drop is not None):
        raise ConfigError("--data and --max-accuracy-drop are for --backend auto, which measures accuracy; "
                          f"backend {backend} times random inputs")
    config = BenchConfig(backend=backend, batch_sizes=parse_batch_sizes(batch_sizes), threads=threads,
                         rounds=rounds, runs_per_round=runs_per_round, time_budget_s=time_budget,
                         precision=precision, **({"max_accuracy_drop": max_accuracy_drop}
                                                 if max_accuracy_drop is not None else {}))
    token_merge = token_merge_config(given or {})
    compact_source = compact if token_merge is None else with_token_merge(compact, token_merge)
    bundle = None
    if backend == AUTO:
        compact_source, bundle = _auto_data(compact_source, data, data_root)
    progress = None if json_out else (lambda line: err_console.print(line, markup=False))
    result = benchmark(dense, compact_source, config, progress=progress, data=bundle)
    paths = write_report(result, out) if out is not None else {}
    if json_out:
        print_json({**result.to_dict(), "files": {k: str(v) for k, v in paths.items()}})
        return
    _print_table(result)
    if result.auto is not None:
        console.print(f"backend auto chose {result.auto['chosen']} ({result.environment['backend']}); "
                      "the candidates, timed on the compact model:", markup=False)
        console.print(table_of(result.auto), markup=False, soft_wrap=True)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")


def _auto_data(compact: ModelSource, data: str | None, data_root: Path | None) -> tuple[BenchModel, DataBundle]:
    """The compact model and the data backend auto measures accuracy on, at its input (as deploy loads it)."""
    if data is None:
        raise ConfigError("--backend auto measures each candidate's accuracy, as deploy does: pass --data SOURCE "
                          f"({', '.join(DATA_SOURCES.names())})")
    model = resolve(compact)
    return model, vc.load_data_for(auto_module(model), data, data_root, batch_size=64, aug="none")


def _print_table(result: BenchResult) -> None:
    table = Table(title=f"{result.dense.label} ({result.dense.precision}) vs {result.compact.label} "
                        f"({result.compact.precision}) "
                        f"({result.environment['backend']}, {result.environment['threads']} thread(s))")
    level = int(result.config.confidence * 100)
    for name in ("batch", "dense p50 ms", "compact p50 ms", escape(f"speed-up [{level}% CI]"), "ideal",
                 "dense img/s", "compact img/s"):
        table.add_column(name, justify="right")
    for b in result.batches:
        s = b.speedup
        table.add_row(str(b.batch_size), f"{b.dense.p50:.2f}", f"{b.compact.p50:.2f}",
                      escape(f"{s.value:.3f}x [{s.low:.3f}, {s.high:.3f}]"),
                      "n/a" if b.ideal_speedup is None else f"{b.ideal_speedup:.3f}x",
                      f"{b.dense.throughput:.1f}", f"{b.compact.throughput:.1f}")
    console.print(table)
