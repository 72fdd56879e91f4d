"""The dense / compact pairs the benchmark scripts measure, built the same way each time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import vitcompact as vc
from vitcompact.bench.harness import BenchConfig, benchmark
from vitcompact.io import write_json, write_text
from vitcompact.latency import environment


@dataclass(frozen=True)
class PruneCase:
    """Layer-wise magnitude pruning of `head_ratio` of each block's heads, `mlp_ratio` of its neurons."""

    name: str
    slug: str  # folder-name form
    head_ratio: float
    mlp_ratio: float


# The research configuration removes 2 of 6 heads (vit_small) or 1 of 3 (vit-cifar-tiny): a third.
RESEARCH = PruneCase("heads 1/3, MLP 0.3", "research", 1 / 3, 0.3)
HALF = PruneCase("heads 0.5, MLP 0.5", "half", 0.5, 0.5)


def dense_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return vc.create_model(name).eval()


def compact_model(dense: nn.Module, case: PruneCase, round_to: int = 1) -> nn.Module:
    """The compact model of `dense` for `case`; `round_to` aligns MLP widths to a multiple."""
    config = vc.RegroupConfig(target="both", head_ratio=case.head_ratio, mlp_ratio=case.mlp_ratio, mode="layer-wise",
                              round_to=round_to)
    masks = vc.regroup(dense, vc.magnitude_prune(dense, 0.3), config)
    return vc.compact(dense, masks).eval()


def calibration_data(model: nn.Module, source: str, root: str | None, images: int) -> vc.DataBundle:
    """`images` unaugmented images of `source` at the model's input, in batches of 8: what the speed
    cases calibrate static INT8 on (its timing does not depend on what they show)."""
    c, h, _ = vc.input_size(model)
    return vc.load_data(source, root=root, img_size=h, in_chans=c, batch_size=8, aug="none", limit=images)


def describe(model: nn.Module) -> str:
    """Heads and MLP width of the first block, e.g. '4 heads, MLP 1075'."""
    block = model.blocks[0]
    return f"{block.attn.num_heads} heads, MLP {block.mlp.fc1.out_features}"


def time_pair(dense_onnx: str | Path, other: str | Path, batch: int, threads: int, seconds: float) -> dict:
    """`other` against the dense ONNX at `batch`, interleaved in one run: p50s and the median ratio
    with its 95 % interval."""
    b = benchmark(Path(dense_onnx), Path(other), BenchConfig(batch_sizes=(batch,), threads=threads, rounds=30,
                                                            runs_per_round=2, time_budget_s=seconds)).batches[0]
    return {"dense_p50_ms": b.dense.p50, "p50_ms": b.compact.p50, "speedup": b.speedup.value,
            "speedup_low": b.speedup.low, "speedup_high": b.speedup.high, "rounds": b.rounds}


def ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (a study's seeds, counts or r values)."""
    return tuple(int(v) for v in text.split(","))


def write_study(out: Path, name: str, report: dict[str, Any], threads: int, markdown: Callable[[dict], str],
                plot: Callable[[dict, Path], Any], backend: str = "ort-cpu") -> dict[str, Any]:
    """Record the machine in `report` (`backend`, onnxruntime CPU by default, at `threads`) and write
    `<name>.json`, `<name>.md` and `<name>.png` into `out`."""
    report["environment"] = environment({"backend": backend, "threads": threads,
                                         "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    files = [out / f"{name}.{ext}" for ext in ("json", "md", "png")]
    write_json(files[0], report)
    write_text(files[1], markdown(report))
    plot(report, files[2])
    print(f"wrote {', '.join(map(str, files))}")
    return report
