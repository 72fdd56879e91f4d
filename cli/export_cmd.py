"""`vitcompact export onnx|tensorrt`: the shipped files, verified."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import vitcompact as vc
from vitcompact.data import DATA_SOURCES
from vitcompact.errors import ConfigError
from vitcompact.export import (ExportConfig, ExportResult, Int8Config, ParityReport, TensorRTConfig, export_all,
                               to_tensorrt)
from vitcompact.export.graph import GRAPHS
from vitcompact.export.int8 import CALIBRATIONS, INT8_MODES
from vitcompact.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

from .common import JsonOption, console, print_json, user_errors

export_app = typer.Typer(help="Export a model to ONNX (and ONNX to a TensorRT engine), verified.",
                         no_args_is_help=True)


def _parity_text(parity: ParityReport | None) -> str:
    if parity is None:
        return "not verified"
    diffs = ", ".join(f"batch {b}: {d:.2g}" for b, d in parity.max_abs_diff.items())
    return f"max |diff| vs {parity.reference} {diffs} (tolerance {parity.atol:g})"


@export_app.command("onnx")
@user_errors
def onnx_cmd(
    model: str = typer.Argument(..., help="Artifact directory, preset name or timm ViT name."),
    out: Path = typer.Argument(..., help="The .onnx file to write."),
    opset: int = typer.Option(DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET})."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an FP16 variant (<out>.fp16.onnx)."),
    int8: str | None = typer.Option(None, "--int8", help=f"Also write an INT8 variant (<out>.int8.onnx): "
                                                          f"{' or '.join(INT8_MODES)}."),
    calib_data: str | None = typer.Option(
        None, help=f"INT8: data source whose training split calibrates (static) and whose validation "
                   f"and test splits measure accuracy: {', '.join(DATA_SOURCES.names())}."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Folder of the data source's files."),
    calib_batches: int = typer.Option(Int8Config.calib_batches, help="Static INT8: calibration batches of 64."),
    calib_method: str = typer.Option(Int8Config.calibration, help=f"Static INT8: {', '.join(CALIBRATIONS)}."),
    int8_scope: str = typer.Option(Int8Config.scope, help="Static INT8: linear (weight layers only) or all."),
    int8_fp32_ends: bool = typer.Option(False, "--int8-fp32-ends",
                                        help="Static INT8: keep the patch embedding and the head in FP32."),
    max_accuracy_drop: float = typer.Option(
        Int8Config.max_accuracy_drop, help="INT8: refuse a file losing more validation top-1 points than this."),
    seed: int = typer.Option(0, help="Seed of the validation split (the one the model was trained with)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the file against PyTorch."),
    optimize: str = typer.Option("auto", help="Graph optimisation: auto (keep if faster), on, off."),
    graph: str = typer.Option(ExportConfig.graph, help=f"Graph traced: {' or '.join(GRAPHS)} (README \"ONNX\")."),
    json_out: bool = JsonOption,
) -> None:
    """Export to ONNX with a dynamic batch axis and metadata, verified against PyTorch.

    Example: vitcompact export onnx runs/demo/compact runs/demo/model.onnx --fp16
    --int8 static --calib-data digits
    """
    config = ExportConfig(opset=opset, verify=verify, optimize=optimize, graph=graph)
    int8_config = None
    if int8 is not None:
        int8_config = Int8Config(mode=int8, calibration=calib_method, calib_batches=calib_batches,
                                 scope=int8_scope, fp32_ends=int8_fp32_ends,
                                 max_accuracy_drop=max_accuracy_drop)
        if int8_config.mode == "static" and calib_data is None:
            raise ConfigError("--int8 static needs --calib-data SOURCE (training images to calibrate on)")
    elif calib_data is not None:
        raise ConfigError("--calib-data is for INT8; add --int8 static (or dynamic)")
    loaded = vc.create_model(model)
    # Unaugmented at the model's input: training split to calibrate, validation and test to measure.
    data = (vc.load_data_for(loaded, calib_data, data_root, batch_size=64, seed=seed, aug="none")
            if calib_data is not None else None)
    results = export_all(loaded, out, config, fp16=fp16, int8=int8_config, data=data)
    if json_out:
        print_json([r.to_dict() for r in results])
        return
    table = Table(title=f"{model} -> ONNX")
    for column in ("file", "precision", "verification", "seconds"):
        table.add_column(column)
    for r in results:
        table.add_row(str(r.path), r.precision, _parity_text(r.parity), f"{r.seconds:.1f}")
    console.print(table)
    if results[0].optimized is not None:
        console.print(f"graph optimisation: {results[0].optimized.reason}", markup=False)
    for r in results:
        if r.precision == "int8" and "accuracy" in r.int8:
            console.print(_int8_text(r), markup=False)


def _int8_text(result: ExportResult) -> str:
    acc = result.int8["accuracy"]
    return "INT8 top-1 " + ", ".join(
        f"{split} {a['int8']:.4f} (fp32 {a['fp32']:.4f}, {-a['drop_points']:+.2f} points)"
        for split, a in acc.items())


@export_app.command("tensorrt")
@user_errors
def tensorrt_cmd(
    onnx_file: Path = typer.Argument(..., help="The fp32 .onnx file (exported with --optimize off)."),
    out: Path = typer.Argument(..., help="The engine file to write."),
    fp16: bool = typer.Option(False, "--fp16", help="Build an FP16 engine instead of FP32."),
    min_batch: int = typer.Option(1, help="Smallest batch the engine accepts."),
    opt_batch: int = typer.Option(8, help="Batch the engine is tuned for."),
    max_batch: int = typer.Option(64, help="Largest batch the engine accepts."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the engine against onnxruntime."),
    json_out: bool = JsonOption,
) -> None:
    """Build a TensorRT engine (NVIDIA GPU and the tensorrt extra needed), verified against onnxruntime.

    Example: vitcompact export tensorrt runs/demo/model.onnx runs/demo/model.engine --fp16
    """
    config = TensorRTConfig(precision="fp16" if fp16 else "fp32", min_batch=min_batch,
                            opt_batch=opt_batch, max_batch=max_batch, verify=verify)
    result = to_tensorrt(onnx_file, out, config)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"{result.path}: {result.precision} engine, batch {result.profile[0]}..{result.profile[2]} "
                  f"(opt {result.profile[1]}), TensorRT {result.tensorrt_version}", markup=False)
    console.print(_parity_text(result.parity), markup=False)
