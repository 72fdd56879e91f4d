"""The end-to-end workflow behind `pipeline` and `demo`: data -> train -> prune -> compact ->
export -> verify -> bench -> report. It lives beside the CLI because it ties the core, export and
bench together (the core never imports those)."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import vitcompact as vc
from vitcompact.bench import BenchConfig, benchmark, write_report
from vitcompact.data import load_data
from vitcompact.errors import ConfigError
from vitcompact.export import ExportConfig, to_onnx
from vitcompact.io import ensure_dir, write_json, write_text
from vitcompact.prune.loop import PruneConfig, prune
from vitcompact.train import TrainConfig, evaluate, train

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
    states: int = 3
    epochs_per_state: int = 4
    finetune_epochs: int = 6
    opset: int = 18
    optimize: str = "auto"
    backend: str = "ort-cpu"
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    threads: int | None = None
    bench_seconds: float = 8.0
    seed: int = 0

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        flat.update({k: v for k, v in overrides.items() if v is not None})
        if "batch_sizes" in flat:
            flat["batch_sizes"] = tuple(int(b) for b in flat["batch_sizes"])
        return cls(**flat)


@dataclass
class PipelineResult:
    out: Path
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _model_input_size(model: torch.nn.Module) -> tuple[int, int]:
    return model.patch_embed.proj.in_channels, model.patch_embed.img_size[0]


def _onnx_top1(path: Path, loader) -> float:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for images, labels in loader:
        logits = session.run(None, {name: images.numpy()})[0]
        correct += int((np.argmax(logits, axis=1) == labels.numpy()).sum())
        total += len(labels)
    return correct / max(total, 1)


def run_pipeline(cfg: PipelineConfig, log=print) -> PipelineResult:
    """Run every stage, writing into `cfg.out`; returns the summary that `report.md` shows."""
    out = ensure_dir(cfg.out)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    stage = _Stages(log)

    with stage("model and data"):
        model = (vc.load_checkpoint(cfg.model, cfg.checkpoint) if cfg.checkpoint else
                 vc.load(cfg.model) if Path(cfg.model).is_dir() else vc.create_model(cfg.model))
        vc.vit_layout(model)
        in_chans, img_size = _model_input_size(model)
        bundle = load_data(cfg.data, root=cfg.data_root, img_size=img_size, in_chans=in_chans,
                           batch_size=cfg.batch_size, seed=cfg.seed)
        if bundle.num_classes != model.num_classes:
            raise ConfigError(f"{cfg.data} has {bundle.num_classes} classes but the model has "
                              f"{model.num_classes}; pass a model built for it")
    if cfg.train_epochs > 0:
        with stage(f"train dense model ({cfg.train_epochs} epochs)"):
            train(model, bundle, TrainConfig(epochs=cfg.train_epochs, lr=cfg.lr, seed=cfg.seed),
                  description="dense")
    dense_test = evaluate(model, bundle.test)
    vc.save(model, out / "dense", provenance={"data": cfg.data, "test": dense_test})

    with stage(f"{cfg.method} pruning (heads {cfg.head_ratio}, MLP {cfg.mlp_ratio})"):
        result = prune(copy.deepcopy(model), bundle, PruneConfig(
            method=cfg.method, target=cfg.target, head_ratio=cfg.head_ratio, mlp_ratio=cfg.mlp_ratio,
            criteria=cfg.criteria, mode=cfg.mode, states=cfg.states, epochs_per_state=cfg.epochs_per_state,
            finetune_epochs=cfg.finetune_epochs, lr=cfg.lr, seed=cfg.seed, out_dir=out / "prune"))

    with stage("compact"):
        pruned = result.model.eval()
        small = vc.compact(pruned, result.masks).eval()
        x = torch.randn(4, in_chans, img_size, img_size)
        with torch.no_grad():
            compact_gap = float((small(x) - pruned(x)).abs().max())
        compact_test = evaluate(small, bundle.test)
        vc.save(small, out / "compact", provenance={"data": cfg.data, "method": cfg.method,
                                                    "test": compact_test})

    with stage("export ONNX and verify"):
        export_cfg = ExportConfig(opset=cfg.opset, optimize=cfg.optimize)
        dense_onnx = to_onnx(model, out / "dense.onnx", export_cfg)
        compact_onnx = to_onnx(small, out / "compact.onnx", export_cfg)
        onnx_top1 = _onnx_top1(compact_onnx.path, bundle.test)

    with stage(f"benchmark dense vs compact ({cfg.backend})"):
        bench = benchmark(dense_onnx.path, compact_onnx.path, BenchConfig(
            backend=cfg.backend, batch_sizes=cfg.batch_sizes, threads=cfg.threads,
            time_budget_s=cfg.bench_seconds, seed=cfg.seed))
        bench_files = write_report(bench, out / "bench")

    dense_count, compact_count = vc.count(model), vc.count(small)
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "accuracy": {"dense_test_top1": dense_test["top1"], "compact_test_top1": compact_test["top1"],
                     "compact_onnx_test_top1": onnx_top1},
        "structure": result.masks.structure().summary(),
        "params": {"dense": dense_count.params, "compact": compact_count.params},
        "macs": {"dense": dense_count.macs, "compact": compact_count.macs},
        "ideal_speedup": dense_count.macs / compact_count.macs,
        "compact_vs_masked_max_abs_diff": compact_gap,
        "onnx_parity": {"dense": dense_onnx.parity.to_dict() if dense_onnx.parity else None,
                        "compact": compact_onnx.parity.to_dict() if compact_onnx.parity else None},
        "latency": [{"batch": b.batch_size, "dense_p50_ms": b.dense.p50, "compact_p50_ms": b.compact.p50,
                     "speedup": b.speedup.value, "speedup_ci": [b.speedup.low, b.speedup.high],
                     "ideal": b.ideal_speedup} for b in bench.batches],
        "seconds": round(time.perf_counter() - started, 1),
    }
    files = {"report": str(out / "report.md"), "plot": str(bench_files["png"]),
             "onnx": str(compact_onnx.path), "compact": str(out / "compact"), "dense": str(out / "dense")}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", render_report(summary, Path(bench_files["png"]).relative_to(out)))
    return PipelineResult(out, summary, files)


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
        f"| params | {s['params']['dense']:,} | {s['params']['compact']:,} |",
        f"| MACs / image | {s['macs']['dense']:,} | {s['macs']['compact']:,} |", "",
        f"Compact vs masked model: max |Δlogits| = {s['compact_vs_masked_max_abs_diff']:.2e}. "
        f"Ideal speed-up (MACs): {s['ideal_speedup']:.2f}x.", "",
        f"## Latency ({s['config']['backend']}, dense and compact interleaved)", "",
        "| batch | dense p50 (ms) | compact p50 (ms) | measured speed-up [95% CI] | ideal |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in s["latency"]:
        lo, hi = row["speedup_ci"]
        lines.append(f"| {row['batch']} | {row['dense_p50_ms']:.3f} | {row['compact_p50_ms']:.3f} | "
                     f"{row['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] | {row['ideal']:.2f}x |")
    lines += ["", f"![latency]({plot.as_posix()})", "", f"Total time: {s['seconds']} s.", ""]
    return "\n".join(lines)


class _Stages:
    """Announce each stage with a spinner and its duration (the stages have their own bars)."""

    def __init__(self, log):
        self.log = log

    def __call__(self, name: str):
        return _Stage(name, self.log)


class _Stage:
    def __init__(self, name: str, log):
        self.name, self.log = name, log

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.log(f"[bold]>> {self.name}[/bold]")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.log(f"   done in {time.perf_counter() - self.t0:.1f} s")
        return False
