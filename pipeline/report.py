"""The run's report.md, rendered from its summary (the same data as summary.json)."""

from __future__ import annotations

from pathlib import Path

from vitcompact.latency.report import REPORT_PNG, to_markdown

from .summary import PipelineSummary


def _int8_lines(s: PipelineSummary) -> list[str]:
    int8 = s.int8
    if int8 is None:
        return []
    if int8.refused:
        return [f"INT8 ({int8.mode}) not written: {int8.refused}", ""]
    how = (f"static, calibrated ({int8.calibration}) on {int8.calibration_images} training images"
           if int8.mode == "static" else "dynamic")
    val, test = int8.accuracy["val"], int8.accuracy["test"]
    return [f"INT8 `{int8.file}` ({how}): validation top-1 {val.int8:.4f} against FP32 "
            f"{val.fp32:.4f}, test {test.int8:.4f} against {test.fp32:.4f}.", ""]


def _compact_name(s: PipelineSummary) -> str:
    return "compact + token merging" if s.token_merge else "compact"


def _token_merge_lines(s: PipelineSummary) -> list[str]:
    merge = s.token_merge
    if merge is None:
        return []
    return [f"Token merging (ToMe) on the compact model: r={merge.config.r} tokens per block ({merge.config.schedule} "
            f"schedule); test top-1 {merge.test_top1_without:.4f} without it, {merge.test_top1_with:.4f} with it; "
            f"MACs / image {merge.macs_without:,} -> {merge.macs_with:,} ({merge.macs_without / merge.macs_with:.2f}x "
            "ideal from merging alone). The compact artifact, its ONNX and INT8 files and the latency below include "
            "it.", ""]


def _latency_lines(s: PipelineSummary) -> list[str]:
    stacked = s.latency[0].stacked
    name = _compact_name(s)
    lines = [f"| batch | dense p50 (ms) | {name} p50 (ms) | measured speed-up [95% CI] | ideal |"
             + (f" {name} INT8 p50 (ms) | stacked speed-up [95% CI] |" if stacked else ""),
             "|---:|---:|---:|---:|---:|" + ("---:|---:|" if stacked else "")]
    for row in s.latency:
        lo, hi = row.speedup_ci
        line = (f"| {row.batch} | {row.dense_p50_ms:.3f} | {row.compact_p50_ms:.3f} | "
                f"{row.speedup:.2f}x [{lo:.2f}, {hi:.2f}] | {row.ideal:.2f}x |")
        if row.stacked:
            lo, hi = row.int8_speedup_ci
            line += f" {row.int8_p50_ms:.3f} | {row.int8_speedup:.2f}x [{lo:.2f}, {hi:.2f}] |"
        lines.append(line)
    return lines


def _budget_lines(s: PipelineSummary) -> list[str]:
    if not s.latency_budget:
        return []
    return [to_markdown(s.latency_budget), f"![structure](prune/{REPORT_PNG})", ""]


def _deploy_lines(s: PipelineSummary) -> list[str]:
    deployed = s.deploy
    if deployed is None:
        return []
    title = "## Deployment: the measured choice of runtime and precision"
    if deployed.report is None:
        return [title, "", f"Not run: {deployed.skipped}", ""]
    report = deployed.report
    guard = report.get("max_accuracy_drop")
    within = ("(no accuracy guard)" if guard is None else
              f"within {guard:g} points of validation top-1 of onnxruntime FP32")
    return [title, "",
            f"Chosen for the {_compact_name(s)} model: **{deployed.chosen}** "
            f"({', '.join(f'`deploy/{name}`' for name in report['files'])}), the fastest of "
            f"{len(report['candidates'])} candidates {within}; {report['threads']} thread(s), "
            "median ms per batch with the speed-up over onnxruntime FP32 (deploy/deploy.md names the CPU).", "",
            deployed.table().rstrip("\n"), ""]


def render_report(s: PipelineSummary, plot: Path) -> str:
    acc, config = s.accuracy, s.config
    prune = config["prune"]
    int8_test = s.int8.accuracy.get("test") if s.int8 is not None else None
    lines = [
        "# vitcompact report", "",
        f"Model `{config['model']}` on `{config['data']['source']}`, {prune['method']} pruning "
        f"(heads {prune['head_ratio']}, MLP {prune['mlp_ratio']}, criterion {prune['criteria']}): "
        f"{s.structure}.", "",
        f"| | dense | {_compact_name(s)} |", "|---|---:|---:|",
        f"| test top-1 (PyTorch) | {acc.dense_test_top1:.4f} | {acc.compact_test_top1:.4f} |",
        f"| test top-1 (ONNX, onnxruntime) | | {acc.compact_onnx_test_top1:.4f} |",
        *([f"| test top-1 (ONNX INT8) | | {int8_test.int8:.4f} |"] if int8_test else []),
        f"| params | {s.params.dense:,} | {s.params.compact:,} |",
        f"| MACs / image | {s.macs.dense:,} | {s.macs.compact:,} |", "",
        f"Compact vs masked model: max |Δlogits| = {s.compact_vs_masked_max_abs_diff:.2e}. "
        f"Ideal speed-up (MACs): {s.ideal_speedup:.2f}x.{_graph_sentence(s)}", "",
        *_token_merge_lines(s), *_int8_lines(s),
        f"## Latency ({config['bench']['backend']}, each file interleaved with the dense FP32 one)", "",
        *_latency_lines(s),
        "", f"![latency]({plot.as_posix()})", "", *_budget_lines(s), *_deploy_lines(s),
        f"Total time: {s.seconds} s.", "",
    ]
    return "\n".join(lines)


def _graph_sentence(s: PipelineSummary) -> str:
    if s.onnx_graph_optimised is None:  # a summary written before the optimiser was there
        return ""
    how = "optimised" if s.onnx_graph_optimised else "plain (the optimiser was not faster)"
    return f" ONNX graphs {how}, dense and compact alike."
