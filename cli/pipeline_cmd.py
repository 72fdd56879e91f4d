"""`vitcompact pipeline` and `vitcompact demo`: the whole loop in one command."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vitcompact.bench.latency_budget import BudgetRequest
from vitcompact.errors import ConfigError
from vitcompact.pipeline import PipelineConfig, run
from vitcompact.pipeline.config import with_overrides

from .common import JsonOption, console, print_json, user_errors


class RichProgress:
    """Stages as bold lines with their time; a stage with a step count gets a bar (stages that
    train draw their own bars, and rich allows one live display at a time)."""

    bars = True

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        started = time.perf_counter()
        if total is None:
            console.print(f"[bold]>> {name}[/bold]")
            yield lambda *_: None
        else:
            with Progress(TextColumn("[bold]>> {task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(name, total=total)
                yield lambda *_: bar.advance(task)
        console.print(f"   done in {time.perf_counter() - started:.1f} s")

    def note(self, message: str) -> None:
        console.print(f"   {message}", markup=False)


def _run(config: PipelineConfig, json_out: bool) -> None:
    result = run(config, progress=None if json_out else RichProgress())
    if json_out:
        print_json({"out": str(result.out), "files": result.files, **result.summary})
        return
    s = result.summary
    console.print(f"\n[bold]{s['structure']}[/bold]; params {s['params']['dense']:,} -> {s['params']['compact']:,}, "
                  f"MACs {s['macs']['dense']:,} -> {s['macs']['compact']:,} (ideal {s['ideal_speedup']:.2f}x)")
    acc = s["accuracy"]
    console.print(f"test top-1: dense {acc['dense_test_top1']:.4f}, compact {acc['compact_test_top1']:.4f} "
                  f"(ONNX {acc['compact_onnx_test_top1']:.4f})")
    int8 = s.get("int8") or {}
    if "accuracy" in int8:
        console.print(f"INT8 ({int8['mode']}) test top-1 {int8['accuracy']['test']['int8']:.4f} "
                      f"(FP32 compact {int8['accuracy']['test']['fp32']:.4f})")
    elif int8.get("refused"):
        console.print(f"INT8 not written: {int8['refused']}", markup=False)
    for row in s["latency"]:
        stacked = f", compact INT8 {row['int8_speedup']:.2f}x" if "int8_speedup" in row else ""
        console.print(f"batch {row['batch']:>4}: dense {row['dense_p50_ms']:.3f} ms, compact "
                      f"{row['compact_p50_ms']:.3f} ms, speed-up {row['speedup']:.2f}x (ideal {row['ideal']:.2f}x)"
                      f"{stacked}")
    console.print(f"report: {result.files['report']}  plot: {result.files['plot']}  onnx: {result.files['onnx']}")


@user_errors
def pipeline(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML file of a PipelineConfig."),
    model: str | None = typer.Option(None, help="Preset, timm name or artifact directory."),
    checkpoint: str | None = typer.Option(None, help="Dense weights for MODEL (.safetensors/.pth)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start a timm model from its hub weights "
                                    "(needs the internet; offline, pass --checkpoint FILE)."),
    data: str | None = typer.Option(None, help="Data source (digits, fashion-mnist, mnist, cifar10, ...)."),
    data_root: str | None = typer.Option(None, help="Folder of the data source's files."),
    aug: str | None = typer.Option(None, help="Training augmentation: none, light or randaugment."),
    method: str | None = typer.Option(None, help="rsst, refill or oneshot."),
    head_ratio: float | None = typer.Option(None, help="Fraction of heads to remove, in [0, 1)."),
    mlp_ratio: float | None = typer.Option(None, help="Fraction of MLP neurons to remove, in [0, 1)."),
    criteria: str | None = typer.Option(None, help="remain, magnitude, l1, l2 or saliency."),
    train_epochs: int | None = typer.Option(None, help="Dense training epochs before pruning (0: none)."),
    target_speedup: float | None = typer.Option(None, "--target-speedup", help="Prune to this measured speed-up "
                                                "instead of the ratios ([budget] in a config file)."),
    latency_ms: float | None = typer.Option(None, "--latency-ms", help="Prune to this latency (ms per batch)."),
    deploy_batch: int | None = typer.Option(None, "--deploy-batch", help="Batch size the budget is for [default: 1]."),
    backend: str | None = typer.Option(None, "--backend", help="Backend the budget is for [default: ort-cpu]."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads the budget is for [default: 1]."),
    block_removal: str | None = typer.Option(None, "--block-removal", help="When the budget may remove whole blocks: "
                                             "last-resort (only when widths cannot meet it), free, never "
                                             "[default: last-resort]."),
    int8: str | None = typer.Option(None, help="INT8 file stacked on the compact one: static (default, "
                                               "calibrated on training images), dynamic or none."),
    out: str | None = typer.Option(None, "--out", "-o", help="Run folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    json_out: bool = JsonOption,
) -> None:
    """Prune -> compact -> export -> INT8 -> verify -> bench, from flags or a TOML config file.

    The file's sections (data, train, prune, export, int8, bench) are the stages' configs, with
    their field names; flags override the file.

    Example: vitcompact pipeline --config examples/pipeline.toml --out runs/mine
    """
    overrides = {"model": model, "checkpoint": checkpoint, "pretrained": pretrained or None,
                 "data.source": data, "data.root": data_root, "data.aug": aug,
                 "prune.method": method, "prune.head_ratio": head_ratio, "prune.mlp_ratio": mlp_ratio,
                 "prune.criteria": criteria, "train.epochs": train_epochs, "int8.mode": int8, "out": out,
                 "overwrite": overwrite or None}
    base = PipelineConfig.from_toml(config) if config is not None else PipelineConfig()
    overrides["budget"] = budget_with_flags(base.budget, target_speedup=target_speedup, latency_ms=latency_ms,
                                            deploy_batch=deploy_batch, backend=backend, threads=threads,
                                            block_removal=block_removal)
    _run(with_overrides(base, **overrides), json_out)


def budget_with_flags(budget: BudgetRequest | None, **flags) -> BudgetRequest | None:
    """The config file's `[budget]` with the budget flags given (not None) put over it: a target
    flag replaces the file's target, the other flags only what they name."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return budget
    if given.keys() & {"target_speedup", "latency_ms"}:
        given.setdefault("target_speedup", None)
        given.setdefault("latency_ms", None)
    elif budget is None:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')} sets up a latency budget; give --target-speedup "
                          "or --latency-ms (or a [budget] section in the config file)")
    return dataclasses.replace(budget, **given) if budget is not None else BudgetRequest(**given)


@user_errors
def demo(
    out: str = typer.Option("runs/demo", "--out", "-o", help="Run folder."),
    json_out: bool = JsonOption,
) -> None:
    """The main job, end to end on the built-in digits data, in a few minutes on a CPU.

    The run folder is replaced when the new run has finished (a failed run leaves it as it was).

    Trains a small ViT, prunes heads and MLP neurons (one-shot, the default method), compacts,
    exports ONNX, verifies parity, benchmarks dense vs compact and writes report.md, a PNG plot,
    the ONNX file and the artifact.

    Example: vitcompact demo --out runs/demo
    """
    _run(PipelineConfig(out=out, overwrite=True), json_out)
