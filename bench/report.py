"""Benchmark reports: `bench.json` (versioned schema), `bench.md` (a table) and `bench.png` (plots)."""

from __future__ import annotations

import os
from pathlib import Path

from vitcompact.export.deployment import table_of
from vitcompact.io import ensure_dir, save_figure, write_json, write_text

from .harness import BenchResult

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "bench.json", "bench.md", "bench.png"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def to_markdown(result: BenchResult) -> str:
    env = result.environment
    level = int(result.config.confidence * 100)
    lines = [
        f"# {result.dense.label} vs {result.compact.label}",
        "",
        f"Backend `{env.get('backend')}`, {env.get('threads')} thread(s), CPU {env.get('cpu')}, "
        f"GPU {env.get('gpu') or 'none'}; torch {env.get('torch')}, timm {env.get('timm')}, "
        f"onnxruntime {env.get('onnxruntime')}, TensorRT {env.get('tensorrt') or 'n/a'}"
        + (f", graph optimisation `{env['graph_optimization']}`" if "graph_optimization" in env else "")
        + (f"; OpenVINO {env.get('openvino')} {env.get('precision')} (runs {env.get('inference_precision')}), "
           f"{env.get('streams')} stream(s), hint {env.get('performance_hint')}, CPU's best ISA "
           f"{env.get('cpu_features', {}).get('best_isa')}" if env.get("backend") == "openvino" else "")
        + ".",
        "",
        f"| batch | dense p50 ms | dense p90 ms | dense p99 ms | compact p50 ms | compact p90 ms "
        f"| compact p99 ms | measured speed-up [{level}% CI] | ideal | measured/ideal "
        f"| dense img/s | compact img/s | rounds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in result.batches:
        s = b.speedup
        lines.append(
            f"| {b.batch_size} | {b.dense.p50:.2f} | {b.dense.p90:.2f} | {b.dense.p99:.2f} "
            f"| {b.compact.p50:.2f} | {b.compact.p90:.2f} | {b.compact.p99:.2f} "
            f"| {s.value:.3f}x [{s.low:.3f}, {s.high:.3f}] | {_fmt(b.ideal_speedup, '.3f')}x "
            f"| {_fmt(b.efficiency, '.3f')} | {b.dense.throughput:.1f} | {b.compact.throughput:.1f} "
            f"| {b.rounds}x{result.config.runs_per_round} |")
    if result.batches and result.batches[0].ideal_speedup is None:
        lines += ["", "Ideal speed-up unknown: an ONNX input has no `macs` metadata "
                      "(export it with `vitcompact export`)."]
    lines += ["", "Speed-up: dense p50 / compact p50. Interval: paired bootstrap over rounds of the "
                  "ratio of medians. Ideal: dense MACs / compact MACs per image.", ""]
    return "\n".join(lines + (_auto_section(result.auto) if result.auto is not None else []))


def _auto_section(auto: dict) -> list[str]:
    """Backend auto: what it chose and the table of every candidate, as deploy.md has it."""
    guard = auto["max_accuracy_drop"]
    return ["## Measured choice (backend auto)", "",
            f"Chosen: **{auto['chosen']}** (backend `{auto['backend']}`), the fastest of {len(auto['candidates'])} "
            "candidates timed on the compact model"
            + (" (no accuracy guard)." if guard is None else f" within {guard:g} points of validation top-1 of "
               f"onnxruntime FP32 ({auto['reference_accuracy']:.4f}).")
            + (f" {auto['note']}." if auto.get("note") else ""), "",
            table_of(auto)]


def _batch_ticks(ax, sizes: list[int]) -> None:
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xticks([], minor=True)  # log-scale minor ticks would label 2x10^0 and the like


def plot(result: BenchResult, path: str | os.PathLike) -> Path:
    """Latency vs batch size for both models, and measured (with interval) vs ideal speed-up."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    sizes = [b.batch_size for b in result.batches]
    fig, (lat, spd) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in (("dense", "tab:blue"), ("compact", "tab:orange")):
        stats = [getattr(b, name) for b in result.batches]
        p50 = [s.p50 for s in stats]
        spread = [[s.p50 - min(s.p50, s.p90) for s in stats], [s.p90 - s.p50 for s in stats]]
        lat.errorbar(sizes, p50, yerr=spread, marker="o", capsize=3, color=color,
                     label=f"{name} p50 (bar to p90)")
    lat.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency per batch (ms)",
            title="Latency")
    _batch_ticks(lat, sizes)
    lat.yaxis.set_major_formatter(ScalarFormatter())
    lat.legend()
    measured = [b.speedup.value for b in result.batches]
    err = [[b.speedup.value - b.speedup.low for b in result.batches],
           [b.speedup.high - b.speedup.value for b in result.batches]]
    spd.errorbar(sizes, measured, yerr=err, marker="o", capsize=3, color="tab:green",
                 label=f"measured ({int(result.config.confidence * 100)}% CI)")
    ideal = [b.ideal_speedup for b in result.batches]
    if all(i is not None for i in ideal):
        spd.plot(sizes, ideal, linestyle="--", color="black", label="ideal (MACs ratio)")
    spd.axhline(1.0, color="grey", linewidth=0.8)
    spd.set(xscale="log", xlabel="batch size", ylabel="speed-up (dense / compact)", title="Speed-up")
    _batch_ticks(spd, sizes)
    spd.legend()
    fig.suptitle(f"{result.dense.label} vs {result.compact.label} "
                 f"({result.environment.get('backend')}, {result.environment.get('threads')} thread(s))",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def write_report(result: BenchResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out_dir`; return their paths keyed
    "json", "md" and "png"."""
    out = ensure_dir(out_dir)
    return {"json": write_json(out / JSON_NAME, result.to_dict()),
            "md": write_text(out / MARKDOWN_NAME, to_markdown(result)),
            "png": plot(result, out / PLOT_NAME)}
