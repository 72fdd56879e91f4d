"""The end-to-end workflow behind `pipeline` and `demo`: data -> train -> prune -> compact ->
export -> verify -> bench -> report. It lives beside the CLI because it ties the core, export and
bench together (the core never imports those)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.bench import BenchConfig, benchmark, write_report
from vitcompact.bench.backends import BACKENDS
from vitcompact.bench.sources import resolve
from vitcompact.data import DATA_SOURCES, load_data
from vitcompact.errors import ConfigError
from vitcompact.export import AccuracyDropError, ExportConfig, Int8Config, to_int8, to_onnx
from vitcompact.export.verify import loader_top1, onnx_runner, ort_session
from vitcompact.io import ensure_dir, temp_dir, write_json, write_text
from vitcompact.prune.loop import PruneConfig, prune
from vitcompact.train import TrainConfig, evaluate, train
from vitcompact.validate import field_types

from .common import console

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class PipelineConfig:
    """Every knob of a pipeline run; a TOML file's keys are these names (sections optional)."""

    model: str = "vit-digits"
    checkpoint: str | None = None
    out: str = "runs/pipeline"
    data: str = "digits"
    data_root: str | None = None
    batch_size: int = 64
    train_epochs: int = 30
    lr: float = 3e-3
    method: str = "rsst"
    target: str = "both"
    head_ratio: float = 0.5
    mlp_ratio: float = 0.5
    criteria: str = "magnitude"
    mode: str = "layer-wise"
    states: int = 2
    epochs_per_state: int = 4
    finetune_epochs: int = 10
    opset: int = 18
    optimize: str = "auto"
    int8: str = "static"  # none, dynamic or static: the stacked compact INT8 file
    calib_method: str = "minmax"
    calib_batches: int = 16
    max_accuracy_drop: float = 1.0
    backend: str = "ort-cpu"
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    threads: int | None = 1  # one pinned thread: steadier ratios than sharing cores
    bench_seconds: float = 10.0
    seed: int = 0
    overwrite: bool = False

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, dict):  # sections such as [prune] only group keys
                flat.update(value)
            else:
                flat[key] = value
        flat.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**field_types(cls, flat))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass
class PipelineResult:
    out: Path
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _model_input_size(model: torch.nn.Module) -> tuple[int, int]:
    return model.patch_embed.proj.in_channels, model.patch_embed.img_size[0]


def _stage_configs(cfg: PipelineConfig) -> tuple[PruneConfig, ExportConfig, Int8Config | None, BenchConfig]:
    """Every stage's config, checked before any work starts, so bad input fails in a second."""
    prune_cfg = PruneConfig(
        method=cfg.method, target=cfg.target, head_ratio=cfg.head_ratio, mlp_ratio=cfg.mlp_ratio,
        criteria=cfg.criteria, mode=cfg.mode, states=cfg.states, epochs_per_state=cfg.epochs_per_state,
        finetune_epochs=cfg.finetune_epochs, lr=cfg.lr, seed=cfg.seed, out_dir=Path(cfg.out) / "prune")
    prune_cfg.check()
    export_cfg = ExportConfig(opset=cfg.opset, optimize=cfg.optimize).validate()
    if cfg.int8 not in ("none", "dynamic", "static"):
        raise ConfigError(f"int8 must be none, dynamic or static, got {cfg.int8!r}")
    int8_cfg = None if cfg.int8 == "none" else Int8Config(
        mode=cfg.int8, calibration=cfg.calib_method, calib_batches=cfg.calib_batches,
        max_accuracy_drop=cfg.max_accuracy_drop)
    bench_cfg = BenchConfig(backend=cfg.backend, batch_sizes=cfg.batch_sizes, threads=cfg.threads,
                            time_budget_s=cfg.bench_seconds, seed=cfg.seed)
    bench_cfg.check()
    BACKENDS.get(cfg.backend)
    DATA_SOURCES.get(cfg.data)
    if cfg.train_epochs < 0:
        raise ConfigError(f"train_epochs must be >= 0, got {cfg.train_epochs}")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or output_folder.contents(out)) and not cfg.overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pass --overwrite to replace it "
                          "or choose another --out")
    return prune_cfg, export_cfg, int8_cfg, bench_cfg


def run_pipeline(cfg: PipelineConfig, log=print) -> PipelineResult:
    """Run every stage into a hidden sibling folder that replaces `cfg.out` only when all stages
    succeed: a failed or interrupted run leaves the previous folder as it was."""
    _stage_configs(cfg)
    out = Path(cfg.out)
    ensure_dir(out.parent)
    with output_folder.lock(out):
        _stage_configs(cfg)  # again, now as the folder's only writer
        work = temp_dir(out.parent, f".{out.name}.partial-")
        try:
            result = _run(dataclasses.replace(cfg, out=str(work)), log, out)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    result.out = out
    result.files = {k: str(out / Path(v).relative_to(work)) for k, v in result.files.items()}
    return result


def _run(cfg: PipelineConfig, log, final_out: Path) -> PipelineResult:
    quiet = log is _quiet
    prune_cfg, export_cfg, int8_cfg, bench_cfg = _stage_configs(cfg)
    prune_cfg.train = TrainConfig(progress=not quiet)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)

    # Model and data first and silently: most user errors surface here, before any output.
    model = vc.load_model(cfg.model, cfg.checkpoint)
    vc.vit_layout(model)
    in_chans, img_size = _model_input_size(model)
    bundle = load_data(cfg.data, root=cfg.data_root, img_size=img_size, in_chans=in_chans,
                       batch_size=cfg.batch_size, seed=cfg.seed)
    if bundle.num_classes != model.num_classes:
        raise ConfigError(f"{cfg.data} has {bundle.num_classes} classes but the model has "
                          f"{model.num_classes}; pass a model built for it")
    out = ensure_dir(cfg.out)
    if cfg.train_epochs > 0:
        with _stage(f"train dense model ({cfg.train_epochs} epochs)", log):
            train(model, bundle, TrainConfig(epochs=cfg.train_epochs, lr=cfg.lr, seed=cfg.seed, progress=not quiet),
                  description="dense")
    dense_test = evaluate(model, bundle.test)
    vc.save(model, out / "dense", provenance={"data": cfg.data, "test": dense_test})

    with _stage(f"{cfg.method} pruning (heads {cfg.head_ratio}, MLP {cfg.mlp_ratio})", log):
        result = prune(copy.deepcopy(model), bundle, prune_cfg)

    with _stage("compact and evaluate", log, total=2) as advance:
        pruned = result.model.eval()
        small = vc.compact(pruned, result.masks).eval()
        x = torch.randn(4, in_chans, img_size, img_size)
        with torch.no_grad():
            compact_gap = float((small(x) - pruned(x)).abs().max())
        advance()
        compact_test = evaluate(small, bundle.test)
        vc.save(small, out / "compact", provenance={"data": cfg.data, "method": cfg.method,
                                                    "test": compact_test})
        advance()

    with _stage("export ONNX, verify, evaluate", log, total=3) as advance:
        compact_onnx = to_onnx(small, out / "compact.onnx", export_cfg)
        advance()
        # The dense reference gets the compact model's graph treatment, so the bench compares
        # like with like (an `auto` decision of its own could fuse one graph and not the other).
        same = "on" if compact_onnx.optimized else "off"
        dense_onnx = to_onnx(model, out / "dense.onnx", dataclasses.replace(export_cfg, optimize=same))
        advance()
        onnx_top1 = loader_top1(onnx_runner(ort_session(compact_onnx.path)), bundle.test)
        advance()

    int8, int8_refused = None, None
    if int8_cfg is not None:
        with _stage(f"{cfg.int8} INT8 of the compact model, measured on validation and test", log):
            try:
                int8 = to_int8(compact_onnx.path, config=int8_cfg, data=bundle)
            except AccuracyDropError as e:  # the run goes on without the stacked file, saying why
                int8_refused = str(e)
                log(f"   INT8 refused: {e}")

    benches = 2 if int8 is not None else 1
    with _stage(f"benchmark dense vs compact ({cfg.backend})", log, total=benches * len(cfg.batch_sizes)) as advance:
        dense_bm, compact_bm = resolve(dense_onnx.path), resolve(compact_onnx.path)
        dense_bm.label, compact_bm.label = "dense.onnx", "compact.onnx"  # not the temporary run folder
        bench = benchmark(dense_bm, compact_bm, bench_cfg, progress=advance)
        bench_files = write_report(bench, out / "bench")
        stacked = None
        if int8 is not None:
            int8_bm = resolve(int8.path)
            int8_bm.label = int8.path.name
            stacked = benchmark(dense_bm, int8_bm, bench_cfg, progress=advance)
            write_report(stacked, out / "bench-int8")

    dense_count, compact_count = vc.count(model), vc.count(small)
    summary = {
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                   "out": str(final_out)},
        "accuracy": {"dense_test_top1": dense_test["top1"], "compact_test_top1": compact_test["top1"],
                     "compact_onnx_test_top1": onnx_top1},
        "structure": result.masks.structure().summary(),
        "params": {"dense": dense_count.params, "compact": compact_count.params},
        "macs": {"dense": dense_count.macs, "compact": compact_count.macs},
        "ideal_speedup": dense_count.macs / compact_count.macs,
        "compact_vs_masked_max_abs_diff": compact_gap,
        "onnx_graph_optimised": bool(compact_onnx.optimized),
        "onnx_parity": {"dense": dense_onnx.parity.to_dict() if dense_onnx.parity else None,
                        "compact": compact_onnx.parity.to_dict() if compact_onnx.parity else None},
        "int8": {**int8.int8, "file": int8.path.name} if int8 is not None else
                {"mode": cfg.int8, "refused": int8_refused} if int8_refused else None,
        "latency": [{"batch": b.batch_size, "dense_p50_ms": b.dense.p50, "compact_p50_ms": b.compact.p50,
                     "speedup": b.speedup.value, "speedup_ci": [b.speedup.low, b.speedup.high],
                     "ideal": b.ideal_speedup, **_stacked_row(stacked, i)} for i, b in enumerate(bench.batches)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    files = {"report": str(out / "report.md"), "plot": str(bench_files["png"]),
             "onnx": str(compact_onnx.path), "compact": str(out / "compact"), "dense": str(out / "dense"),
             **({"int8_onnx": str(int8.path)} if int8 is not None else {})}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", render_report(summary, Path(bench_files["png"]).relative_to(out)))
    return PipelineResult(out, summary, files)


def _stacked_row(stacked, i: int) -> dict[str, Any]:
    """The compact INT8 file's latency at one batch size, timed against the same dense file."""
    if stacked is None:
        return {}
    b = stacked.batches[i]
    return {"int8_p50_ms": b.compact.p50, "int8_speedup": b.speedup.value,
            "int8_speedup_ci": [b.speedup.low, b.speedup.high]}


def _int8_lines(s: dict[str, Any]) -> list[str]:
    int8 = s.get("int8")
    if not int8:
        return []
    if int8.get("refused"):
        return [f"INT8 ({int8['mode']}) not written: {int8['refused']}", ""]
    how = (f"static, calibrated ({int8['calibration']}) on {int8['calibration_images']} training images"
           if int8["mode"] == "static" else "dynamic")
    acc = int8["accuracy"]
    return [f"INT8 `{int8['file']}` ({how}): validation top-1 {acc['val']['int8']:.4f} against FP32 "
            f"{acc['val']['fp32']:.4f}, test {acc['test']['int8']:.4f} against {acc['test']['fp32']:.4f}.", ""]


def render_report(s: dict[str, Any], plot: Path) -> str:
    acc = s["accuracy"]
    lines = [
        "# vitcompact report", "",
        f"Model `{s['config']['model']}` on `{s['config']['data']}`, {s['config']['method']} pruning "
        f"(heads {s['config']['head_ratio']}, MLP {s['config']['mlp_ratio']}, criterion "
        f"{s['config']['criteria']}): {s['structure']}.", "",
        "| | dense | compact |", "|---|---:|---:|",
        f"| test top-1 (PyTorch) | {acc['dense_test_top1']:.4f} | {acc['compact_test_top1']:.4f} |",
        f"| test top-1 (ONNX, onnxruntime) | | {acc['compact_onnx_test_top1']:.4f} |",
        *([f"| test top-1 (ONNX INT8) | | {s['int8']['accuracy']['test']['int8']:.4f} |"]
          if s.get("int8") and "accuracy" in s["int8"] else []),
        f"| params | {s['params']['dense']:,} | {s['params']['compact']:,} |",
        f"| MACs / image | {s['macs']['dense']:,} | {s['macs']['compact']:,} |", "",
        f"Compact vs masked model: max |Δlogits| = {s['compact_vs_masked_max_abs_diff']:.2e}. "
        f"Ideal speed-up (MACs): {s['ideal_speedup']:.2f}x. ONNX graphs "
        f"{'optimised' if s['onnx_graph_optimised'] else 'plain (the optimiser was not faster)'}, "
        f"dense and compact alike.", "", *_int8_lines(s),
        f"## Latency ({s['config']['backend']}, each file interleaved with the dense FP32 one)", "",
    ]
    stacked = "int8_p50_ms" in s["latency"][0]
    lines += ["| batch | dense p50 (ms) | compact p50 (ms) | measured speed-up [95% CI] | ideal |"
              + (" compact INT8 p50 (ms) | stacked speed-up [95% CI] |" if stacked else ""),
              "|---:|---:|---:|---:|---:|" + ("---:|---:|" if stacked else "")]
    for row in s["latency"]:
        lo, hi = row["speedup_ci"]
        line = (f"| {row['batch']} | {row['dense_p50_ms']:.3f} | {row['compact_p50_ms']:.3f} | "
                f"{row['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] | {row['ideal']:.2f}x |")
        if stacked:
            lo, hi = row["int8_speedup_ci"]
            line += f" {row['int8_p50_ms']:.3f} | {row['int8_speedup']:.2f}x [{lo:.2f}, {hi:.2f}] |"
        lines.append(line)
    lines += ["", f"![latency]({plot.as_posix()})", "", f"Total time: {s['seconds']} s.", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _stage(name: str, log, total: int | None = None) -> Iterator[Callable[[], None]]:
    """Announce a stage and time it; with `total`, show a progress bar that the callback advances
    (stages that train draw their own bars, and rich allows one live display at a time)."""
    t0 = time.perf_counter()
    if total is None or log is _quiet:
        log(f"[bold]>> {name}[/bold]")
        yield lambda *_: None
    else:
        with Progress(TextColumn("[bold]>> {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(name, total=total)
            yield lambda *_: bar.advance(task)
    log(f"   done in {time.perf_counter() - t0:.1f} s")


def _quiet(*_: Any) -> None:
    """The log of a --json run: nothing but the JSON reaches stdout."""
