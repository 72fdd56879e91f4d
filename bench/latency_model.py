"""The latency model behind pruning to a budget: measure a `LatencyTable` for one ViT on one backend,
batch size and thread count, cache it, and check its predictions against measured latency.

Every number comes from a variant of the model built by `vitcompact.compact` (so it is exactly what
compaction produces) and timed interleaved with the dense model, as the bench harness times pairs:

- the depth-0 model (every block dropped; timm runs an empty block list): the fixed cost;
- every block at (0 heads, 0 neurons), i.e. two constant adds: `base_ms` = (its ms - fixed) / depth;
- every block at (h, 0) for h = 1..H: `head_ms[h]` = (its ms - all-(0, 0) ms) / depth;
- every block at (0, w) for w on the width grid: `mlp_ms` likewise.

A variant's ms is the median of its runs times (the dense model's median over the whole run) / (its
median in the variant's own rounds), so that slow phases of a shared machine cancel.

    .venv/bin/python -m vitcompact.bench.latency_model --model vit-cifar-tiny --batch 1 --threads 1 \
        --target-speedups 1.5,2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

import vitcompact as vc
from vitcompact.errors import ArtifactError, ConfigError, VitCompactError
from vitcompact.export import ExportConfig
from vitcompact.io import ensure_dir, read_json, write_json
from vitcompact.models.presets import SOURCE_ATTR
from vitcompact.pruning.budget import LatencyBudget, LatencyTable
from vitcompact.pruning.masks import head_view
from vitcompact.validate import integer

from .backends import BackendOptions, make_backend
from .cases import dense_model
from .environment import environment
from .harness import BenchConfig, measure_pair
from .sources import resolve

SCHEMA = "vitcompact.latency-table/1"
DEFAULT_MLP_POINTS = 9
# The bench defaults; a table only predicts graphs built and optimised the same way.
GRAPH_OPTIMIZATION, ONNX_OPTIMIZE = "all", "off"
VERSION_KEYS = ("vitcompact", "torch", "timm", "onnx", "onnxruntime", "cpu")
GPU_KEYS = ("gpu", "tensorrt")

Progress = Callable[[str], None]
Blocks = list[tuple[int, int]]  # (heads, MLP width) per block


@dataclass(frozen=True)
class TableTiming:
    """How each variant is timed against the dense model: rounds of the harness, capped by
    `seconds_per_variant` (both models together), never under `min_rounds`."""

    warmup: int = 3
    rounds: int = 50
    runs_per_round: int = 2
    min_rounds: int = 3
    seconds_per_variant: float = 4.0

    def bench_config(self, backend: str, batch: int, threads: int, seed: int) -> BenchConfig:
        return BenchConfig(backend=backend, batch_sizes=(batch,), threads=threads, warmup=self.warmup,
                           rounds=self.rounds, runs_per_round=self.runs_per_round, min_rounds=self.min_rounds,
                           time_budget_s=self.seconds_per_variant, graph_optimization=GRAPH_OPTIMIZATION,
                           onnx_optimize=ONNX_OPTIMIZE, seed=seed)


def block_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(depth, heads, head_dim, MLP width) of a dense ViT whose blocks all have the same shape."""
    if vc.is_compact(model):
        raise ConfigError("a latency table is measured on the dense model; pass the model before compaction")
    blocks = vc.vit_layout(model).blocks
    shapes = {(b.num_heads, b.head_dim, b.hidden) for b in blocks}
    if len(shapes) != 1 or 0 in next(iter(shapes)):
        raise ConfigError("a latency table needs a model whose blocks all have the same heads and MLP width")
    heads, head_dim, hidden = shapes.pop()
    return len(blocks), heads, head_dim, hidden


def width_grid(hidden: int, round_to: int) -> list[int]:
    """MLP widths a structure may have: multiples of `round_to` from 0, and the full width."""
    integer("round_to", round_to, 1)
    return sorted({*range(0, hidden, round_to), hidden})


def measured_widths(hidden: int, round_to: int, mlp_points: int | None = None) -> list[int]:
    """The widths the table measures: `mlp_points` (default 9) evenly spaced over the grid, 0 and
    the full width always among them; the table interpolates between them."""
    grid = width_grid(hidden, round_to)
    points = integer("mlp_points", DEFAULT_MLP_POINTS if mlp_points is None else mlp_points, 2)
    if points >= len(grid):
        return grid
    return sorted({grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)})


def first_units_masks(model: nn.Module, blocks: Sequence[tuple[int, int]]) -> vc.PruneMasks:
    """Masks keeping the first h heads and first w neurons of each block; which units are kept
    does not change latency."""
    masks = vc.PruneMasks.ones(model)
    for layout, (heads, width) in zip(masks.layout.blocks, blocks, strict=True):
        for name, m in masks.block_masks(layout).items():
            if ".attn." in name:
                head_view(name, m, layout)[:, heads:] = False
            elif name.endswith("fc1.weight"):
                m[width:] = False
            else:
                m[:, width:] = False
    return masks


def _timing_copy(model: nn.Module) -> nn.Module:
    """A copy whose branch output biases are nonzero, so a removed branch leaves its constant add
    as it does in a trained model (timm initialises these biases to zero)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                if layer.bias is not None:
                    layer.bias.fill_(0.01)
    return model


def _depth_zero(model: nn.Module) -> nn.Module:
    """The model with every block dropped: patch embedding, tokens, final norm and head only."""
    empty = copy.deepcopy(model)
    empty.blocks = nn.Sequential()
    return empty


class _Interleaved:
    """Times models against one loaded dense model on one backend, pair by pair (harness rounds)."""

    def __init__(self, dense: nn.Module, backend: str, batch: int, threads: int, timing: TableTiming,
                 seed: int, progress: Progress | None = None):
        self.torch_threads = torch.get_num_threads()  # the torch backend pins threads process-wide
        self.backend = make_backend(backend, BackendOptions(threads, GRAPH_OPTIMIZATION, ONNX_OPTIMIZE, seed))
        self.batch, self.config = batch, timing.bench_config(backend, batch, threads, seed)
        self.progress = progress
        self.dense = self.backend.load(resolve(dense))(batch)
        self.pairs: list[tuple[float, float]] = []  # (model median, dense median) per timed model

    def time(self, model: nn.Module, label: str) -> int:
        """Time `model` against the dense one; its index for `ms` and `pairs`."""
        run = self.backend.load(resolve(model))(self.batch)
        dense_ms, model_ms = measure_pair(self.dense, run, self.batch, self.config, [])
        self.pairs.append((float(np.median(model_ms)), float(np.median(dense_ms))))
        if self.progress:
            self.progress(f"{label}: {self.pairs[-1][0]:.3f} ms (dense {self.pairs[-1][1]:.3f} ms)")
        return len(self.pairs) - 1

    @property
    def dense_ms(self) -> float:
        return statistics.median(d for _, d in self.pairs)

    def ms(self, index: int) -> float:
        """The model's median, scaled by the run's dense median over its own pair's."""
        model, dense = self.pairs[index]
        return model * self.dense_ms / dense

    def __enter__(self) -> "_Interleaved":
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.torch_threads)


def measure_table(model: nn.Module, backend: str = "ort-cpu", batch: int = 1, threads: int = 1,
                  round_to: int = 1, mlp_points: int | None = None, seed: int = 0,
                  progress: Progress | None = None, timing: TableTiming | None = None) -> LatencyTable:
    """Measure `model`'s latency table on `backend` at `batch` images and `threads` threads (see the
    module docstring); MLP widths are multiples of `round_to`, `mlp_points` of them measured."""
    key = cache_key(model, backend, batch, threads, round_to, mlp_points)
    depth, heads, _, hidden = block_shape(model)
    widths = key["mlp_widths"]
    source = _timing_copy(model)
    shapes = [(0, 0)] + [(h, 0) for h in range(1, heads + 1)] + [(0, w) for w in widths[1:]]
    with _Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress) as timer:
        fixed = timer.time(_depth_zero(source), "depth 0")
        uniform = [timer.time(vc.compact(source, first_units_masks(source, [(h, w)] * depth)),
                              f"every block at {h} heads, MLP width {w}") for h, w in shapes]
        fixed_ms, (empty_ms, *rest) = timer.ms(fixed), [timer.ms(i) for i in uniform]
        dense_ms = timer.dense_ms
    # Noise can make a small difference negative; a branch never saves time by running.
    per_block = [max(0.0, (t - empty_ms) / depth) for t in rest]
    return LatencyTable(key, depth, fixed_ms, max(0.0, (empty_ms - fixed_ms) / depth),
                        (0.0, *per_block[:heads]), tuple(widths), (0.0, *per_block[heads:]), dense_ms)


def versions(backend_on_gpu: bool = False) -> dict[str, Any]:
    """Library versions and hardware a timing depends on (GPU ones only for a GPU backend)."""
    env = environment({})
    keys = VERSION_KEYS + (GPU_KEYS if backend_on_gpu else ())
    return {**{k: env[k] for k in keys}, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def cache_key(model: nn.Module, backend: str, batch: int, threads: int, round_to: int = 1,
              mlp_points: int | None = None) -> dict[str, Any]:
    """What a latency table depends on: the model's configuration, backend and its graph settings
    (the ONNX opset and graph the bench exports), batch, threads, the measured widths, and library
    versions and hardware."""
    depth, heads, head_dim, hidden = block_shape(model)
    integer("batch", batch, 1)
    integer("threads", threads, 1)
    on_gpu = make_backend(backend, BackendOptions(threads)).on_gpu  # also refuses an unknown name
    source = getattr(model, SOURCE_ATTR, None) or {}
    exported = ExportConfig()  # the bench exports with the defaults
    config = {"architecture": source.get("architecture"), "model_args": source.get("model_args"),
              "embed_dim": model.embed_dim, "depth": depth, "num_heads": heads, "head_dim": head_dim,
              "hidden": hidden, "input_size": list(vc.input_size(model)), "num_classes": model.num_classes}
    return {"schema": SCHEMA, "model": json.loads(json.dumps(config, default=str)),
            "backend": backend, "graph_optimization": GRAPH_OPTIMIZATION, "onnx_optimize": ONNX_OPTIMIZE,
            "opset": exported.opset, "graph": exported.graph,
            "batch": batch, "threads": threads, "round_to": round_to,
            "mlp_widths": measured_widths(hidden, round_to, mlp_points), "versions": versions(on_gpu)}


def default_cache_dir() -> Path:
    """`$VITCOMPACT_CACHE/latency`, else `~/.cache/vitcompact/latency`."""
    root = os.environ.get("VITCOMPACT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vitcompact") / "latency"


def cache_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.json"


def _cached(path: Path, key: dict[str, Any]) -> LatencyTable | None:
    """The table stored at `path` if its key is `key`; None when missing, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        stored = read_json(path)
        if stored.get("key") != json.loads(json.dumps(key)):
            return None
        return LatencyTable.from_dict(stored["table"])
    except (ArtifactError, ConfigError, AttributeError, KeyError):
        return None


def latency_table(model: nn.Module, backend: str = "ort-cpu", batch: int = 1, threads: int = 1,
                  round_to: int = 1, mlp_points: int | None = None, cache_dir: str | os.PathLike | None = None,
                  refresh: bool = False, progress: Progress | None = None) -> LatencyTable:
    """`measure_table`, cached as JSON under `cache_dir` (default `default_cache_dir()`) by a hash
    of `cache_key`; a stored table is used only if its key equals the current one."""
    key = cache_key(model, backend, batch, threads, round_to, mlp_points)
    path = cache_path(key, cache_dir)
    table = None if refresh else _cached(path, key)
    if table is not None:
        if progress:
            progress(f"latency table from {path}")
        return table
    table = measure_table(model, backend, batch, threads, round_to, mlp_points, progress=progress)
    ensure_dir(path.parent)
    write_json(path, {"key": key, "table": table.to_dict()})
    return table


def random_structures(table: LatencyTable, count: int, round_to: int, seed: int = 0) -> list[Blocks]:
    """`count` structures with per-block head counts uniform on 0..H and widths uniform on the grid."""
    rng = np.random.default_rng(seed)
    grid = width_grid(table.hidden, round_to)
    return [[(int(rng.integers(0, table.num_heads + 1)), int(grid[rng.integers(0, len(grid))]))
             for _ in range(table.depth)] for _ in range(count)]


def validate_table(model: nn.Module, table: LatencyTable, backend: str = "ort-cpu", batch: int = 1,
                   threads: int = 1, structures: int = 10, seed: int = 0, progress: Progress | None = None,
                   timing: TableTiming | None = None) -> dict[str, Any]:
    """Predicted against measured latency of `structures` random structures, each compacted and
    timed interleaved with the dense model, and the median absolute relative error. `error` takes
    the measured latency times (table's dense ms / dense ms now), as the machine may have sped up
    or slowed down since the table was measured; `raw_error` takes it as measured."""
    block_shape(model)
    round_to = int(table.key.get("round_to", 1))
    source = _timing_copy(model)
    cases = random_structures(table, structures, round_to, seed)
    with _Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress) as timer:
        indices = [timer.time(vc.compact(source, first_units_masks(source, blocks)),
                              f"structure {i}, predicted {table.predict(blocks):.3f} ms")
                   for i, blocks in enumerate(cases)]
        dense_ms = timer.dense_ms
        # The machine may run faster or slower than when the table was measured: `error` compares
        # with the measured latency rescaled by the dense model's (table / now), `raw_error` without.
        drift = table.dense_ms / dense_ms
        rows = []
        for blocks, index in zip(cases, indices):
            predicted, measured = table.predict(blocks), timer.ms(index)
            rows.append({"blocks": [list(b) for b in blocks], "predicted_ms": predicted, "measured_ms": measured,
                         "error": predicted / (measured * drift) - 1.0, "raw_error": predicted / measured - 1.0})
    return {"structures": rows, "dense_ms": dense_ms, "table_dense_ms": table.dense_ms,
            "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
            "median_abs_raw_error": statistics.median(abs(r["raw_error"]) for r in rows)}


def check_speedups(model: nn.Module, table: LatencyTable, targets: Sequence[float], backend: str = "ort-cpu",
                   batch: int = 1, threads: int = 1, round_to: int = 1, seed: int = 0,
                   progress: Progress | None = None, timing: TableTiming | None = None) -> list[dict[str, Any]]:
    """For each requested speed-up: allocate with magnitude scores under `LatencyBudget(table, x)`,
    compact, and time against the dense model; requested, predicted and measured speed-ups."""
    source = _timing_copy(model)
    rows = []
    with _Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress) as timer:
        for target in targets:
            config = vc.RegroupConfig(budget=LatencyBudget(table, target), round_to=round_to)
            masks = vc.regroup(source, vc.PruneMasks.ones(source), config)
            blocks = masks.structure().shape()
            compact_ms, dense_ms = timer.pairs[timer.time(vc.compact(source, masks), f"{target:g}x")]
            rows.append({"requested": target, "predicted": table.reference_ms / table.predict(blocks),
                         "measured": dense_ms / compact_ms, "blocks": [list(b) for b in blocks],
                         "dense_ms": dense_ms, "compact_ms": compact_ms})
    for row in rows:
        row["error"] = row["measured"] / row["requested"] - 1.0
    return rows


def _print_table(table: LatencyTable) -> None:
    print(f"fixed {table.fixed_ms:.3f} ms, per block: base {table.base_ms:.4f} ms; dense measured "
          f"{table.dense_ms:.3f} ms, predicted {table.full_ms:.3f} ms "
          f"({table.full_ms / table.dense_ms - 1:+.1%})")
    print("heads  " + " ".join(f"{h:>8d}" for h in range(table.num_heads + 1)))
    print("ms     " + " ".join(f"{t:8.4f}" for t in table.head_ms))
    print("width  " + " ".join(f"{w:>8d}" for w in table.mlp_widths))
    print("ms     " + " ".join(f"{t:8.4f}" for t in table.mlp_ms))


def _print_validation(report: dict[str, Any]) -> None:
    print(f"{'structure':>9} {'heads':>6} {'neurons':>8} {'predicted':>10} {'measured':>9} {'error':>7} "
          f"{'raw':>7}")
    for i, row in enumerate(report["structures"]):
        heads, neurons = (sum(b[k] for b in row["blocks"]) for k in (0, 1))
        print(f"{i:9d} {heads:6d} {neurons:8d} {row['predicted_ms']:10.3f} {row['measured_ms']:9.3f} "
              f"{row['error']:+7.1%} {row['raw_error']:+7.1%}")
    print(f"median |error| {report['median_abs_error']:.1%} (target <= 5 %), "
          f"{report['median_abs_raw_error']:.1%} raw; dense {report['dense_ms']:.3f} ms now, "
          f"{report['table_dense_ms']:.3f} ms when the table was measured (error rescales by their ratio)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-cifar-tiny")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--round-to", type=int, default=1, help="MLP widths are multiples of this")
    p.add_argument("--mlp-points", type=int, default=None, help=f"MLP widths measured (default {DEFAULT_MLP_POINTS})")
    p.add_argument("--structures", type=int, default=10, help="random structures to validate the table on")
    p.add_argument("--target-speedups", type=_speedups, default=[], help="comma-separated speed-ups to allocate, e.g. 1.5,2")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $VITCOMPACT_CACHE/latency or ~/.cache")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached table fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write everything printed as JSON here")
    args = p.parse_args(argv)
    try:
        _run(args)
    except VitCompactError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _speedups(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1.5,2, got {text!r}") from None


def _run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    model = dense_model(args.model, args.seed)
    where = f"{args.model}, {args.backend}, batch {args.batch}, {args.threads} thread(s)"
    table = latency_table(model, args.backend, args.batch, args.threads, args.round_to, args.mlp_points,
                          args.cache_dir, args.refresh, _progress)
    print(f"latency table of {where} ({time.perf_counter() - start:.0f} s)")
    _print_table(table)
    out: dict[str, Any] = {"table": table.to_dict()}
    if args.structures:
        out["validation"] = validate_table(model, table, args.backend, args.batch, args.threads, args.structures,
                                           args.seed, _progress)
        _print_validation(out["validation"])
    if args.target_speedups:
        out["speedups"] = check_speedups(model, table, args.target_speedups, args.backend, args.batch, args.threads,
                                         args.round_to, args.seed, _progress)
        print(f"{'requested':>9} {'predicted':>9} {'measured':>9} {'error':>7}  structure (heads, width)")
        for row in out["speedups"]:
            print(f"{row['requested']:8.3f}x {row['predicted']:8.3f}x {row['measured']:8.3f}x "
                  f"{row['error']:+7.1%}  {row['blocks']}")
    out["seconds"] = time.perf_counter() - start
    print(f"{out['seconds']:.0f} s; {table.key['versions']['cpu']}; onnxruntime "
          f"{table.key['versions']['onnxruntime']}; other processes on this machine add noise")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
