"""`vitcompact export onnx|openvino|tensorrt`: the shipped files, verified."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import vitcompact as vc
from vitcompact.data import DATA_SOURCES
from vitcompact.errors import ConfigError
from vitcompact.export import (ExportConfig, ExportResult, Int8Config, OpenVINOConfig, OpenVINOResult, ParityReport,
                               TensorRTConfig, export_all, to_openvino, to_tensorrt)
from vitcompact.export.graph import GRAPHS
from vitcompact.export.int8 import CALIBRATIONS, INT8_MODES
from vitcompact.export.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

from .common import (DataRootOption, JsonOption, console, print_json, token_merge_config, token_merge_options,
                     user_errors)
from .options import config_options

export_app = typer.Typer(help="Export a model to ONNX or an OpenVINO IR (and ONNX to a TensorRT engine), verified.",
                         no_args_is_help=True)


def _parity_text(parity: ParityReport | None) -> str:
    if parity is None:
        return "not verified"
    diffs = ", ".join(f"batch {b}: {d:.2g}" for b, d in parity.max_abs_diff.items())
    return f"max |diff| vs {parity.reference} {diffs} (tolerance {parity.atol:g})"


@export_app.command("onnx")
@user_errors
@config_options(token_merge_options("the exported model (instead of what an artifact records)"))
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT (and its variants) where they exist."),
    json_out: bool = JsonOption,
    given: dict | None = None,
) -> None:
    """Export to ONNX with a dynamic batch axis and metadata, verified against PyTorch.

    Example: vitcompact export onnx runs/demo/compact runs/demo/model.onnx --fp16
    --int8 static --calib-data digits --token-merge 2
    """
    config = ExportConfig(opset=opset, verify=verify, optimize=optimize, graph=graph)
    token_merge = token_merge_config(given or {})
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
    if token_merge is not None:
        vc.merge_tokens(loaded, token_merge)
    # Unaugmented at the model's input: training split to calibrate, validation and test to measure.
    data = (vc.load_data_for(loaded, calib_data, data_root, batch_size=64, seed=seed, aug="none")
            if calib_data is not None else None)
    results = export_all(loaded, out, config, fp16=fp16, int8=int8_config, data=data, overwrite=overwrite)
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


@export_app.command("openvino")
@user_errors
def openvino_cmd(
    model: str = typer.Argument(..., help="Artifact directory, preset name, timm ViT name or fp32 .onnx file."),
    out: Path = typer.Argument(..., help="The .xml file to write (its .bin goes beside it)."),
    precision: str = typer.Option(OpenVINOConfig.precision, help="f32, bf16 or int8."),
    int8_source: str = typer.Option(OpenVINOConfig.int8_source, help="INT8: nncf (NNCF post-training), qdq "
                                    "(vitcompact's static INT8 ONNX, converted) or auto (both; keeps the faster)."),
    calib_data: str | None = typer.Option(
        None, help=f"Data source whose training split calibrates INT8 and whose validation split checks bf16 and "
                   f"INT8 accuracy: {', '.join(DATA_SOURCES.names())}."),
    data_root: Path | None = DataRootOption,
    max_accuracy_drop: float = typer.Option(
        OpenVINOConfig.max_accuracy_drop, help="bf16 / INT8: refuse an IR losing more validation top-1 points than this."),
    threads: int | None = typer.Option(None, help="OpenVINO threads for the checks (default: its own)."),
    seed: int = typer.Option(0, help="Seed of the validation split (the one the model was trained with)."),
    graph: str = typer.Option(ExportConfig.graph, help=f"Graph traced: {' or '.join(GRAPHS)} (README \"ONNX\")."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the IR against the FP32 model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT (and its .bin) where they exist."),
    json_out: bool = JsonOption,
) -> None:
    """Export to an OpenVINO IR (.xml + .bin; the openvino extra), checked against the FP32 model.

    f32 must match it to the ONNX tolerance; bf16 and INT8 within a logits tolerance and a top-1
    agreement, and with --calib-data their validation top-1 within --max-accuracy-drop points.

    Example: vitcompact export openvino runs/demo/compact runs/demo/compact.xml --precision int8
    --calib-data digits
    """
    if precision == "int8" and calib_data is None:
        raise ConfigError("--precision int8 needs --calib-data SOURCE (training images to calibrate on)")
    config = OpenVINOConfig(precision=precision, int8_source=int8_source, max_accuracy_drop=max_accuracy_drop,
                            threads=threads, verify=verify)
    source = Path(model) if model.endswith(".onnx") else vc.create_model(model)
    if calib_data is not None and isinstance(source, Path):
        raise ConfigError("--calib-data needs the model (artifact directory or name), not an ONNX file")
    data = (vc.load_data_for(source, calib_data, data_root, batch_size=64, seed=seed, aug="none")
            if calib_data is not None else None)
    result = to_openvino(source, out, config, calibration=data, export_config=ExportConfig(graph=graph),
                         overwrite=overwrite)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(_openvino_text(result), markup=False, soft_wrap=True)
    console.print(_parity_text(result.parity), markup=False)


def _openvino_text(result: OpenVINOResult) -> str:
    text = (f"{result.path} (+ {result.bin_path.name}): OpenVINO {result.precision}"
            + (f" from {result.int8_source}" if result.int8_source else "")
            + f", runs in {result.executed_precision} on this CPU, {result.seconds:.1f} s")
    acc = result.accuracy
    if acc:
        text += (f"\nvalidation top-1 {acc['openvino']:.4f} (FP32 {acc['reference']:.4f}, "
                 f"{0.0 - acc['drop_points']:+.2f} points, {acc['images']} images)")
    return text


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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT (and its .json) where they exist."),
    json_out: bool = JsonOption,
) -> None:
    """Build a TensorRT engine (NVIDIA GPU and the tensorrt extra needed), verified against onnxruntime.

    Example: vitcompact export tensorrt runs/demo/model.onnx runs/demo/model.engine --fp16
    """
    config = TensorRTConfig(precision="fp16" if fp16 else "fp32", min_batch=min_batch,
                            opt_batch=opt_batch, max_batch=max_batch, verify=verify)
    result = to_tensorrt(onnx_file, out, config, overwrite=overwrite)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"{result.path}: {result.precision} engine, batch {result.profile[0]}..{result.profile[2]} "
                  f"(opt {result.profile[1]}), TensorRT {result.tensorrt_version}", markup=False)
    console.print(_parity_text(result.parity), markup=False)
