"""`run(config)`: data -> train -> prune -> compact (-> merge tokens) -> export -> INT8 -> verify -> bench
(-> deploy) -> report.

It ties the core, export and bench together (the core never imports those). Every stage writes
into a hidden sibling folder that replaces `config.out` only when all stages succeed, so a failed
or interrupted run leaves the previous folder as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import vitcompact as vc
from vitcompact import output_folder
from vitcompact.bench import BenchResult, benchmark, resolve, write_report
from vitcompact.data import DataBundle
from vitcompact.errors import BackendUnavailableError, ConfigError
from vitcompact.export import AccuracyDropError, ExportResult, deploy, to_int8, to_onnx
from vitcompact.export.openvino_runtime import require_openvino
from vitcompact.export.verify import loader_top1, onnx_runner, ort_session
from vitcompact.io import ensure_dir, sweep_stale_any, temp_dir, write_json, write_text
from vitcompact.models.merge_config import TokenMergeConfig
from vitcompact.models.token_merge import check_token_merge
from vitcompact.pruning.configs import RunFolder
from vitcompact.pruning.loop import prune
from vitcompact.training import evaluate, train

from .config import PipelineConfig, config_dict
from .progress import Progress, Silent
from .report import render_report
from .summary import (Accuracy, DenseCompact, DeploySummary, Int8Summary, LatencyRow, PipelineSummary,
                      TokenMergeSummary)


PARTIAL = ".partial-"  # the work folder beside --out: .OUT.partial-PID-XXXX


@dataclass
class PipelineResult:
    out: Path
    summary: PipelineSummary
    files: dict[str, str] = field(default_factory=dict)


def run(config: PipelineConfig, progress: Progress | None = None) -> PipelineResult:
    """Run every stage of `config` into `config.out` (replaced whole at the end)."""
    progress = progress or Silent()
    out = Path(config.out)
    _check_out(config)
    ensure_dir(out.parent)
    sweep_stale_any(out.parent, PARTIAL)  # what runs killed outright (SIGKILL) left here, whatever their --out
    with output_folder.lock(out):
        _check_out(config)  # again, now as the folder's only writer
        work = temp_dir(out.parent, f".{out.name}{PARTIAL}")
        try:
            result = _stages(config, work, progress)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    result.out = out
    result.files = {k: str(out / Path(v).relative_to(work)) for k, v in result.files.items()}
    result.summary.config["out"] = str(out)
    return result


def _check_out(config: PipelineConfig) -> None:
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or output_folder.contents(out)) and not config.overwrite:
        raise ConfigError(f"{out} already exists and is not empty; pass --overwrite to replace it "
                          "or choose another --out")


def _stages(config: PipelineConfig, out: Path, progress: Progress) -> PipelineResult:
    started = time.perf_counter()
    # Model and data first: most user errors surface here, before any output.
    model, bundle = vc.model_and_data(
        config.model, config.data.source, config.data.root, checkpoint=config.checkpoint,
        pretrained=config.pretrained, reset_classifier=config.data.reset_classifier, seed=config.seed,
        batch_size=config.data.batch_size, aug=config.data.aug, workers=config.data.workers)
    _check_budget(model, config, progress)  # before training: a budget out of reach stops here
    if config.token_merge is not None:  # an r too large for the input size, too
        check_token_merge(model, config.token_merge)
    dense_test = _train_dense(model, bundle, config, progress)
    vc.save(model, out / "dense", provenance={"data": config.data.source, "test": dense_test})
    pruned, masks, budget_report = _prune(model, bundle, config, out, progress)
    small, compact_test, compact_gap, merging = _compact(pruned, masks, bundle, config, _merge(config, budget_report),
                                                         out, progress)
    dense_onnx, compact_onnx, onnx_top1 = _export(model, small, bundle, config, out, progress)
    int8, int8_refused = _int8(compact_onnx, bundle, config, progress)
    bench, stacked, plot = _bench(dense_onnx, compact_onnx, int8, config, out, progress)
    deployed = _deploy(small, bundle, config, out, progress)

    dense_count, compact_count = vc.count(model), vc.count(small)
    summary = PipelineSummary(
        accuracy=Accuracy(dense_test["top1"], compact_test["top1"], onnx_top1),
        structure=masks.structure().summary(),
        params=DenseCompact(dense_count.params, compact_count.params),
        macs=DenseCompact(dense_count.macs, compact_count.macs),
        ideal_speedup=dense_count.macs / compact_count.macs,
        compact_vs_masked_max_abs_diff=compact_gap,
        latency=_latency_rows(bench, stacked),
        seconds=round(time.perf_counter() - started, 1),
        token_merge=merging,
        onnx_graph_optimised=bool(compact_onnx.optimized),
        onnx_parity={"dense": dense_onnx.parity.to_dict() if dense_onnx.parity else None,
                     "compact": compact_onnx.parity.to_dict() if compact_onnx.parity else None},
        int8=_int8_summary(int8, int8_refused, config),
        latency_budget=budget_report,
        deploy=deployed,
        config=config_dict(config),
    )
    files = {"report": str(out / "report.md"), "plot": str(plot), "onnx": str(compact_onnx.path),
             "compact": str(out / "compact"), "dense": str(out / "dense"),
             **({"int8_onnx": str(int8.path)} if int8 is not None else {}),
             **({"deploy": str(out / "deploy")} if deployed is not None and deployed.report else {})}
    write_json(out / "summary.json", summary.to_dict())
    write_text(out / "report.md", render_report(summary, plot.relative_to(out)))
    return PipelineResult(out, summary, files)


def _train_dense(model: nn.Module, bundle: DataBundle, config: PipelineConfig, progress: Progress) -> dict:
    if config.train.epochs > 0:
        with progress.stage(f"train dense model ({config.train.epochs} epochs)"):
            train(model, bundle, dataclasses.replace(config.train, seed=config.seed, progress=progress.bars),
                  description="dense")
    return evaluate(model, bundle.test)


def _check_budget(model: nn.Module, config: PipelineConfig, progress: Progress) -> None:
    """Measure (or read from the cache) the `[budget]` request's latency table before training, so
    a budget out of reach stops the run early; pruning reads the same table back."""
    if config.budget is None:
        return
    with progress.stage(f"latency table ({config.budget.backend}, batch {config.budget.deploy_batch})"):
        config.budget.budget(model, config.prune.round_to, progress=progress.note)


def _prune(model: nn.Module, bundle: DataBundle, config: PipelineConfig, out: Path, progress: Progress):
    """Prune a copy of the dense model (to the ratios, or to the `[budget]`, whose speed-up report
    the prune stage writes beside its masks)."""
    p = config.prune
    # The [token_merge] section is the one merge; `finetune_token_merge` fine-tunes with it on (or
    # with the r a [budget] with the token axis chooses).
    merge = config.token_merge if p.finetune_token_merge else None
    prune_config = dataclasses.replace(p, seed=config.seed, budget=config.budget, token_merge=merge,
                                       train=dataclasses.replace(p.train, progress=progress.bars))
    what = (f"heads {p.head_ratio}, MLP {p.mlp_ratio}" if config.budget is None else
            f"to a latency budget at batch {config.budget.deploy_batch}")
    with progress.stage(f"{p.method} pruning ({what})"):
        result = prune(copy.deepcopy(model), bundle, prune_config, RunFolder(out / "prune"), notes=progress.note)
    # The compact stage merges the compact model itself (with [token_merge], or the r a budget with
    # the token axis chose), measuring it with and without merging.
    return vc.merge_tokens(result.model, None).eval(), result.masks, result.budget


def _merge(config: PipelineConfig, budget_report: dict | None) -> TokenMergeConfig | None:
    """The compact model's token merging: the `[token_merge]` section's, else the budget's choice."""
    if config.token_merge is not None and config.token_merge.enabled:
        return config.token_merge
    chosen = (budget_report or {}).get("token_merge")
    return TokenMergeConfig(r=chosen["r"], schedule=chosen["schedule"]) if chosen else None


def _compact(pruned: nn.Module, masks, bundle: DataBundle, config: PipelineConfig, merge: TokenMergeConfig | None,
             out: Path, progress: Progress) -> tuple[nn.Module, dict, float, TokenMergeSummary | None]:
    """The compact model (merging tokens as `merge` says), its test result, its distance from the
    masked model, and the merging's summary (None without merging)."""
    what = "compact and evaluate" if merge is None else f"compact, merge tokens (r={merge.r}) and evaluate"
    with progress.stage(what, total=2 if merge is None else 3) as advance:
        small = vc.compact(pruned, masks).eval()
        x = torch.randn(4, *vc.input_size(small))
        with torch.no_grad():
            gap = float((small(x) - pruned(x)).abs().max())
        advance()
        test = evaluate(small, bundle.test)
        merging = None
        if merge is not None:
            unmerged = vc.count(small).macs
            vc.merge_tokens(small, merge)
            merged = evaluate(small, bundle.test)
            merging = TokenMergeSummary(merge, test["top1"], merged["top1"], unmerged, vc.count(small).macs)
            test = merged
            advance()
        vc.save(small, out / "compact", provenance={"data": config.data.source, "method": config.prune.method,
                                                    "test": test})
        advance()
    return small, test, gap, merging


def _export(model: nn.Module, small: nn.Module, bundle: DataBundle, config: PipelineConfig, out: Path,
            progress: Progress) -> tuple[ExportResult, ExportResult, float]:
    with progress.stage("export ONNX, verify, evaluate", total=3) as advance:
        compact_onnx = to_onnx(small, out / "compact.onnx", config.export)
        advance()
        # The dense reference gets the compact model's graph treatment, so the bench compares
        # like with like (an `auto` decision of its own could fuse one graph and not the other).
        same = "on" if compact_onnx.optimized else "off"
        dense_onnx = to_onnx(model, out / "dense.onnx", dataclasses.replace(config.export, optimize=same))
        advance()
        top1 = loader_top1(onnx_runner(ort_session(compact_onnx.path)), bundle.test)
        advance()
    return dense_onnx, compact_onnx, top1


def _int8(compact_onnx: ExportResult, bundle: DataBundle, config: PipelineConfig,
          progress: Progress) -> tuple[ExportResult | None, str | None]:
    if config.int8 is None:
        return None, None
    with progress.stage(f"{config.int8.mode} INT8 of the compact model, measured on validation and test"):
        try:
            return to_int8(compact_onnx.path, config=config.int8, data=bundle), None
        except AccuracyDropError as e:  # the run goes on without the stacked file, saying why
            progress.note(f"INT8 refused: {e}")
            return None, str(e)


def _bench(dense_onnx: ExportResult, compact_onnx: ExportResult, int8: ExportResult | None,
           config: PipelineConfig, out: Path, progress: Progress) -> tuple[BenchResult, BenchResult | None, Path]:
    bench_config = dataclasses.replace(config.bench, seed=config.seed)
    files = [("compact.onnx", compact_onnx.path, "bench")]
    if int8 is not None:
        files.append((int8.path.name, int8.path, "bench-int8"))
    dense = resolve(dense_onnx.path)
    dense.label = "dense.onnx"  # not the temporary run folder
    sizes = len(bench_config.batch_sizes or ())
    results = []
    with progress.stage(f"benchmark dense vs compact ({bench_config.backend})", total=len(files) * sizes) as advance:
        for label, path, folder in files:
            other = resolve(path)
            other.label = label
            result = benchmark(dense, other, bench_config, progress=advance)
            written = write_report(result, out / folder)
            results.append((result, written))
    (bench, bench_files), stacked = results[0], (results[1][0] if len(results) > 1 else None)
    return bench, stacked, Path(bench_files["png"])


def _latency_rows(bench: BenchResult, stacked: BenchResult | None) -> list[LatencyRow]:
    """Dense vs compact at each batch size, with the compact INT8 file's latency (timed against the
    same dense file) where there is one."""
    rows = []
    for i, b in enumerate(bench.batches):
        row = LatencyRow(b.batch_size, b.dense.p50, b.compact.p50, b.speedup.value, (b.speedup.low, b.speedup.high),
                         b.ideal_speedup)
        if stacked is not None:
            int8 = stacked.batches[i]
            row.int8_p50_ms, row.int8_speedup = int8.compact.p50, int8.speedup.value
            row.int8_speedup_ci = (int8.speedup.low, int8.speedup.high)
        rows.append(row)
    return rows


def _int8_summary(int8: ExportResult | None, refused: str | None, config: PipelineConfig) -> Int8Summary | None:
    if int8 is not None:
        return Int8Summary.from_dict({**int8.int8, "file": int8.path.name})
    return Int8Summary(config.int8.mode, refused=refused) if refused else None


def _deploy(small: nn.Module, bundle: DataBundle, config: PipelineConfig, out: Path,
            progress: Progress) -> DeploySummary | None:
    """The measured choice of runtime and precision for the compact model, into out/deploy, where
    OpenVINO is installed (elsewhere the summary says why it did not run)."""
    if config.deploy is None:
        return None
    try:
        require_openvino()
    except BackendUnavailableError as e:
        progress.note(f"deploy skipped: {e}")
        return DeploySummary(skipped=str(e))
    deploy_config = dataclasses.replace(config.deploy, seed=config.seed)
    with progress.stage(f"measured choice of runtime and precision ({len(deploy_config.candidates)} candidates)"):
        try:
            result = deploy(small, out / "deploy", deploy_config, bundle, progress=progress.note)
        except AccuracyDropError as e:  # every candidate over the guard: the run goes on, saying so
            progress.note(f"deploy refused: {e}")
            return DeploySummary(skipped=str(e))
    return DeploySummary(report=json.loads((result.out / "deploy.json").read_text()))  # as the file says
