"""`vitcompact pipeline` and `vitcompact demo`: the whole loop in one command."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vitcompact.errors import ConfigError
from vitcompact.latency import BudgetRequest
from vitcompact.pipeline import PipelineConfig, run
from vitcompact.pipeline.config import DataConfig, with_overrides
from vitcompact.pruning.configs import CONFIGS, PruneConfig
from vitcompact.training import TrainConfig

from .common import JsonOption, console, print_json, token_merge_options, user_errors
from .options import Fields, config_options, split


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
        print_json({"out": str(result.out), "files": result.files, **result.summary.to_dict()})
        return
    s = result.summary
    console.print(f"\n[bold]{s.structure}[/bold]; params {s.params.dense:,} -> {s.params.compact:,}, "
                  f"MACs {s.macs.dense:,} -> {s.macs.compact:,} (ideal {s.ideal_speedup:.2f}x)")
    acc = s.accuracy
    console.print(f"test top-1: dense {acc.dense_test_top1:.4f}, compact {acc.compact_test_top1:.4f} "
                  f"(ONNX {acc.compact_onnx_test_top1:.4f})")
    merge = s.token_merge
    if merge is not None:
        console.print(f"token merging r={merge.config.r} ({merge.config.schedule}) on the compact model: test top-1 "
                      f"{merge.test_top1_without:.4f} without, {merge.test_top1_with:.4f} with")
    int8 = s.int8
    if int8 is not None and "test" in int8.accuracy:
        console.print(f"INT8 ({int8.mode}) test top-1 {int8.accuracy['test'].int8:.4f} "
                      f"(FP32 compact {int8.accuracy['test'].fp32:.4f})")
    elif int8 is not None and int8.refused:
        console.print(f"INT8 not written: {int8.refused}", markup=False)
    for row in s.latency:
        stacked = f", compact INT8 {row.int8_speedup:.2f}x" if row.stacked else ""
        console.print(f"batch {row.batch:>4}: dense {row.dense_p50_ms:.3f} ms, compact "
                      f"{row.compact_p50_ms:.3f} ms, speed-up {row.speedup:.2f}x (ideal {row.ideal:.2f}x)"
                      f"{stacked}")
    if s.deploy is not None:
        console.print(f"deploy: {s.deploy.chosen} chosen, in {result.files['deploy']}" if s.deploy.report
                      else f"deploy not run: {s.deploy.skipped}", markup=False)
    console.print(f"report: {result.files['report']}  plot: {result.files['plot']}  onnx: {result.files['onnx']}")


PIPELINE_OPTIONS = (
    Fields(PipelineConfig, "", names=("model", "checkpoint", "pretrained")),
    Fields(DataConfig, "data.", names=("source", "root", "aug"), flags={"source": "--data", "root": "--data-root"}),
    Fields(PruneConfig, "prune.", names=("head_ratio", "mlp_ratio", "criteria")),
    Fields(TrainConfig, "train.", names=("epochs",), flags={"epochs": "--train-epochs"},
           help={"epochs": "Dense training epochs before pruning (0: none)."}),
    Fields(BudgetRequest, "budget.",
           help={"target_speedup": "Prune to this measured speed-up instead of the ratios ([budget] in a config file)."}),
    token_merge_options("the compact model, in its artifact, ONNX and INT8 files and bench ([token_merge] in a "
                        "config file)"),
    Fields(PipelineConfig, "", names=("out", "overwrite"), flags={"out": "--out -o"}),
)


@user_errors
@config_options(*PIPELINE_OPTIONS)
def pipeline(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML file of a PipelineConfig."),
    method: str | None = typer.Option(None, help=f"Pruning method: {', '.join(CONFIGS)}."),
    int8: str | None = typer.Option(None, help="INT8 file stacked on the compact one: static (default, "
                                               "calibrated on training images), dynamic or none."),
    deploy: bool | None = typer.Option(None, "--deploy/--no-deploy",
                                       help="Measure every runtime and precision on the compact model and report the "
                                            "fastest within the accuracy guard (default: on where OpenVINO is "
                                            "installed; \\[deploy] in a config file)."),
    json_out: bool = JsonOption,
    given: dict[str, Any] | None = None,
) -> None:
    """Prune -> compact -> export -> INT8 -> verify -> bench -> deploy, from flags or a TOML config file.

    The file's sections (data, train, prune, export, int8, bench, budget, token_merge, deploy) are the stages'
    configs, with their field names; flags override the file.

    Example: vitcompact pipeline --config examples/pipeline.toml --out runs/mine
    """
    given = dict(given or {})
    budget = {k: given.pop(k) for k in list(given) if k.startswith("budget.")}
    base = PipelineConfig.from_toml(config) if config is not None else PipelineConfig()
    overrides = {"prune.method": method, **given, "int8.mode": int8, "deploy.enabled": deploy,
                 "budget": budget_with_flags(base.budget, **split(budget, "budget."))}
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
    quick: bool = typer.Option(False, "--quick", help="Every stage, with short training and timing (a check "
                                                      "that an install works, in about a third of the time; "
                                                      "the accuracy and speed-ups are not the demo's)."),
    json_out: bool = JsonOption,
) -> None:
    """The main job, end to end on the built-in digits data, in a few minutes on a CPU.

    The run folder is replaced when the new run has finished (a failed run leaves it as it was).

    Trains a small ViT, prunes heads and MLP neurons (one-shot, the default method), compacts,
    exports ONNX, verifies parity, benchmarks dense vs compact and writes report.md, a PNG plot,
    the ONNX file and the artifact.

    Example: vitcompact demo --out runs/demo
    """
    _run(quick_demo(out) if quick else PipelineConfig(out=out, overwrite=True), json_out)


def quick_demo(out: str) -> PipelineConfig:
    """The demo's stages at a fraction of its training and timing: 3 epochs, 2 of fine-tuning,
    a second of timing at two batch sizes, and deploy's OpenVINO INT8 from the static INT8 ONNX
    file alone (instead of also quantising with NNCF to keep the faster)."""
    demo = PipelineConfig(out=out, overwrite=True)
    return with_overrides(demo, **{"train.epochs": 3, "prune.finetune_epochs": 2, "bench.batch_sizes": (1, 32),
                                   "bench.time_budget_s": 1.0, "deploy.batch_sizes": (1,),
                                   "deploy.time_budget_s": 0.2, "deploy.int8_source": "qdq"})
