"""`vitcompact export onnx|tensorrt`: the shipped files, verified."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from vitcompact.export import (ExportConfig, ParityReport, TensorRTConfig, to_fp16, to_int8, to_onnx,
                               to_tensorrt)

from .common import JsonOption, console, print_json, user_errors
from .inspect_cmd import load_any

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
    opset: int = typer.Option(18, help="ONNX opset (17 or newer)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an FP16 variant (<out>.fp16.onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a dynamic INT8 variant (<out>.int8.onnx)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the file against PyTorch."),
    optimize: str = typer.Option("auto", help="Graph optimisation: auto (keep if faster), on, off."),
    json_out: bool = JsonOption,
) -> None:
    """Export to ONNX with a dynamic batch axis and metadata, verified against PyTorch.

    Example: vitcompact export onnx runs/demo/compact runs/demo/model.onnx --fp16 --int8
    """
    config = ExportConfig(opset=opset, verify=verify, optimize=optimize).validate()
    results = [to_onnx(load_any(model), out, config)]
    if fp16:
        results.append(to_fp16(out, verify=verify))
    if int8:
        results.append(to_int8(out, verify=verify))
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
