"""The bench side of pruning to a latency budget: a user's request (a speed-up or milliseconds, at
a deployment batch size, backend and thread count) made into a `LatencyBudget` on a measured,
cached latency table, and the report of what the pruned structure delivers: requested vs
predicted vs measured speed-up, with a plot of the heads and MLP widths kept per block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from vitcompact.errors import ConfigError
from vitcompact.io import ensure_dir, write_json, write_text
from vitcompact.pruning.budget import BLOCK_REMOVAL, LatencyBudget
from vitcompact.pruning.structure import Structure
from vitcompact.validate import in_range, integer, one_of

from .harness import BenchConfig, benchmark
from .latency_model import latency_table
from .report import save_figure

REPORT_JSON, REPORT_MD, REPORT_PNG = "latency_budget.json", "latency_budget.md", "latency_budget.png"


@dataclass(frozen=True)
class BudgetRequest:
    """What a user asks: `target_speedup` or `latency_ms` (exactly one), at `deploy_batch` on
    `backend` with `threads` intra-op threads."""

    target_speedup: float | None = None
    latency_ms: float | None = None
    deploy_batch: int = 1
    backend: str = "ort-cpu"
    threads: int = 1
    block_removal: str = "last-resort"  # when whole blocks may go: last-resort, free, never

    def __post_init__(self) -> None:
        one_of("block removal", self.block_removal, BLOCK_REMOVAL)
        if (self.target_speedup is None) == (self.latency_ms is None):
            raise ConfigError("a latency budget takes exactly one of a target speed-up or a latency in ms")
        if self.target_speedup is not None:
            in_range("target speed-up", self.target_speedup, 1.0, low_open=True)
        if self.latency_ms is not None:
            in_range("latency budget (ms)", self.latency_ms, 0.0, low_open=True)
        integer("deploy batch", self.deploy_batch, 1)
        integer("threads", self.threads, 1)

    def budget(self, model: nn.Module, round_to: int = 1, progress: Callable[[str], None] | None = None,
               cache_dir: str | os.PathLike | None = None) -> LatencyBudget:
        """The budget on `model`'s latency table at this deployment (measured, or from the cache)."""
        table = latency_table(model, self.backend, self.deploy_batch, self.threads, round_to=round_to,
                              cache_dir=cache_dir, progress=progress)
        if self.target_speedup is not None:
            return LatencyBudget(table, self.target_speedup, "speedup", self.block_removal)
        return LatencyBudget(table, self.latency_ms, "ms", self.block_removal)


def budget_report(dense: nn.Module, compact: nn.Module, structure: Structure, budget: LatencyBudget,
                  request: BudgetRequest, time_budget_s: float = 30.0) -> dict[str, Any]:
    """Requested, predicted and measured (dense and compact interleaved, at the deployment batch)
    speed-up and latency, and the kept heads and widths per block."""
    table = budget.table
    predicted_ms = table.predict(structure.shape())
    result = benchmark(dense, compact, BenchConfig(backend=request.backend, batch_sizes=(request.deploy_batch,),
                                                   threads=request.threads, time_budget_s=time_budget_s))
    measured = result.batches[0]
    return {
        "request": {"kind": budget.kind, "target": budget.target, "budget_ms": budget.budget_ms,
                    "block_removal": budget.block_removal,
                    "deploy_batch": request.deploy_batch, "backend": request.backend, "threads": request.threads},
        "requested_speedup": table.reference_ms / budget.budget_ms,
        "predicted": {"ms": predicted_ms, "dense_ms": table.reference_ms, "speedup": table.reference_ms / predicted_ms},
        "measured": {"dense_ms": measured.dense.p50, "compact_ms": measured.compact.p50,
                     "speedup": measured.speedup.value, "low": measured.speedup.low, "high": measured.speedup.high},
        "blocks": [{"heads": h, "of_heads": b.num_heads, "width": w, "of_width": b.hidden}
                   for (h, w), b in zip(structure.shape(), structure.blocks)],
        "table_key": table.key,
    }


def to_markdown(report: dict[str, Any]) -> str:
    r, p, m = report["request"], report["predicted"], report["measured"]
    asked = f"{r['target']:g}x" if r["kind"] == "speedup" else f"{r['target']:g} ms"
    lines = [f"## Latency budget ({r['backend']}, batch {r['deploy_batch']}, {r['threads']} thread(s))", "",
             "| | speed-up | compact latency (ms) |", "|---|---|---|",
             f"| requested ({asked}) | {report['requested_speedup']:.3f}x | {r['budget_ms']:.3f} |",
             f"| predicted (latency table) | {p['speedup']:.3f}x | {p['ms']:.3f} |",
             f"| measured (interleaved with dense) | {m['speedup']:.3f}x [{m['low']:.3f}, {m['high']:.3f}] "
             f"| {m['compact_ms']:.3f} (dense {m['dense_ms']:.3f}) |", "",
             "| block | heads | MLP width |", "|---|---|---|"]
    lines += [f"| {i} | {b['heads']}/{b['of_heads']} | {b['width']}/{b['of_width']} |"
              for i, b in enumerate(report["blocks"])]
    whole = sum(1 for b in report["blocks"] if b["heads"] == 0 and b["width"] == 0)
    lines += ["", f"Whole blocks removed: {whole} (block removal: {r.get('block_removal', 'free')})."]
    return "\n".join(lines) + "\n"


def plot_structure(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Kept share of heads and of MLP neurons per block (a removed block shows as two empty bars)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    index = list(range(len(blocks)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(blocks) + 2), 3.8))
    ax.bar([i - 0.2 for i in index], [b["heads"] / b["of_heads"] for b in blocks], width=0.4, label="heads kept")
    ax.bar([i + 0.2 for i in index], [b["width"] / b["of_width"] for b in blocks], width=0.4, label="MLP width kept")
    for i, b in enumerate(blocks):
        ax.text(i - 0.2, b["heads"] / b["of_heads"] + 0.02, str(b["heads"]), ha="center", fontsize=7)
        ax.text(i + 0.2, b["width"] / b["of_width"] + 0.02, str(b["width"]), ha="center", fontsize=7)
    r, p, m = report["request"], report["predicted"], report["measured"]
    ax.set(xticks=index, xlabel="block", ylabel="kept share", ylim=(0, 1.15),
           title=f"requested {report['requested_speedup']:.2f}x, predicted {p['speedup']:.2f}x, measured "
                 f"{m['speedup']:.2f}x ({r['backend']}, batch {r['deploy_batch']}, {r['threads']} thread(s))")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def write_budget_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    out = ensure_dir(out_dir)
    return {"json": write_json(out / REPORT_JSON, report), "md": write_text(out / REPORT_MD, to_markdown(report)),
            "png": plot_structure(report, out / REPORT_PNG)}
