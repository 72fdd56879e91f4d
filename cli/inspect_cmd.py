"""`vitcompact inspect`: blocks, heads, neurons, params and MACs of a model or artifact."""

from __future__ import annotations

import typer
from rich.table import Table

import vitcompact as vc

from .common import JsonOption, console, print_json, user_errors


@user_errors
def inspect(
    model: str = typer.Argument(..., help="Artifact directory, preset name or timm ViT name."),
    num_classes: int | None = typer.Option(None, help="Override the number of classes."),
    img_size: int | None = typer.Option(None, help="Override the input size."),
    json_out: bool = JsonOption,
) -> None:
    """Show blocks, heads, neurons, params and MACs (dense vs compact for an artifact).

    Example: vitcompact inspect vit-cifar-tiny
    """
    overrides = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    m = vc.create_model(model, **overrides)
    now = vc.count(m)
    record = vc.get_record(m)
    dense = record.dense if record.is_compact else None
    if json_out:
        print_json({"model": model, "count": now.to_dict(), "dense": dense})
        return
    table = Table(title=f"{model}")
    table.add_column("block", justify="right")
    table.add_column("heads", justify="right")
    table.add_column("neurons", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    if dense:
        table.add_column("dense params", justify="right")
        table.add_column("dense MACs", justify="right")
    for i, b in enumerate(now.blocks):
        row = [str(b.index), str(b.heads), str(b.neurons), f"{b.params:,}", f"{b.macs:,}"]
        if dense:
            d = dense["blocks"][i]
            row = [str(b.index), f"{b.heads}/{d['heads']}", f"{b.neurons}/{d['neurons']}",
                   f"{b.params:,}", f"{b.macs:,}", f"{d['params']:,}", f"{d['macs']:,}"]
        table.add_row(*row)
    total = ["total", str(now.heads), str(now.neurons), f"{now.params:,}", f"{now.macs:,}"]
    if dense:
        total += [f"{dense['params']:,}", f"{dense['macs']:,}"]
    table.add_row(*total, style="bold")
    console.print(table)
    if dense:
        console.print(f"compact/dense: params {now.params / dense['params']:.3f}, "
                      f"MACs {now.macs / dense['macs']:.3f} (ideal speed-up {dense['macs'] / now.macs:.2f}x)")
