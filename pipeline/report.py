"""The run's report.md, rendered from its summary (the same data as summary.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitcompact.latency.report import REPORT_PNG, to_markdown


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


def _compact_name(s: dict[str, Any]) -> str:
    return "compact + token merging" if s.get("token_merge") else "compact"


def _token_merge_lines(s: dict[str, Any]) -> list[str]:
    merge = s.get("token_merge")
    if not merge:
        return []
    top1, macs = merge["test_top1"], merge["macs"]
    return [f"Token merging (ToMe) on the compact model: r={merge['r']} tokens per block ({merge['schedule']} "
            f"schedule); test top-1 {top1['without']:.4f} without it, {top1['with']:.4f} with it; MACs / image "
            f"{macs['without']:,} -> {macs['with']:,} ({macs['without'] / macs['with']:.2f}x ideal from merging "
            "alone). The compact artifact, its ONNX and INT8 files and the latency below include it.", ""]


def _latency_lines(s: dict[str, Any]) -> list[str]:
    stacked = "int8_p50_ms" in s["latency"][0]
    name = _compact_name(s)
    lines = [f"| batch | dense p50 (ms) | {name} p50 (ms) | measured speed-up [95% CI] | ideal |"
             + (f" {name} INT8 p50 (ms) | stacked speed-up [95% CI] |" if stacked else ""),
             "|---:|---:|---:|---:|---:|" + ("---:|---:|" if stacked else "")]
    for row in s["latency"]:
        lo, hi = row["speedup_ci"]
        line = (f"| {row['batch']} | {row['dense_p50_ms']:.3f} | {row['compact_p50_ms']:.3f} | "
                f"{row['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] | {row['ideal']:.2f}x |")
        if stacked:
            lo, hi = row["int8_speedup_ci"]
            line += f" {row['int8_p50_ms']:.3f} | {row['int8_speedup']:.2f}x [{lo:.2f}, {hi:.2f}] |"
        lines.append(line)
    return lines


def _budget_lines(s: dict[str, Any]) -> list[str]:
    report = s.get("latency_budget")
    if not report:
        return []
    return [to_markdown(report), f"![structure](prune/{REPORT_PNG})", ""]


def render_report(s: dict[str, Any], plot: Path) -> str:
    acc, config = s["accuracy"], s["config"]
    prune = config["prune"]
    int8_test = (s.get("int8") or {}).get("accuracy", {}).get("test")
    lines = [
        "# vitcompact report", "",
        f"Model `{config['model']}` on `{config['data']['source']}`, {prune['method']} pruning "
        f"(heads {prune['head_ratio']}, MLP {prune['mlp_ratio']}, criterion {prune['criteria']}): "
        f"{s['structure']}.", "",
        f"| | dense | {_compact_name(s)} |", "|---|---:|---:|",
        f"| test top-1 (PyTorch) | {acc['dense_test_top1']:.4f} | {acc['compact_test_top1']:.4f} |",
        f"| test top-1 (ONNX, onnxruntime) | | {acc['compact_onnx_test_top1']:.4f} |",
        *([f"| test top-1 (ONNX INT8) | | {int8_test['int8']:.4f} |"] if int8_test else []),
        f"| params | {s['params']['dense']:,} | {s['params']['compact']:,} |",
        f"| MACs / image | {s['macs']['dense']:,} | {s['macs']['compact']:,} |", "",
        f"Compact vs masked model: max |Δlogits| = {s['compact_vs_masked_max_abs_diff']:.2e}. "
        f"Ideal speed-up (MACs): {s['ideal_speedup']:.2f}x. ONNX graphs "
        f"{'optimised' if s['onnx_graph_optimised'] else 'plain (the optimiser was not faster)'}, "
        f"dense and compact alike.", "", *_token_merge_lines(s), *_int8_lines(s),
        f"## Latency ({config['bench']['backend']}, each file interleaved with the dense FP32 one)", "",
        *_latency_lines(s),
        "", f"![latency]({plot.as_posix()})", "", *_budget_lines(s), f"Total time: {s['seconds']} s.", "",
    ]
    return "\n".join(lines)
