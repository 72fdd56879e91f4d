"""The latency table behind pruning to a budget: measured for one ViT on one backend, batch size and
thread count, cached, and read back only while it still describes this model and machine.

The table holds, for a model whose blocks all have the same shape: the fixed cost outside the
blocks, one block's cost with both branches removed (its constant adds), and one block's attention
branch with 0..H heads and MLP branch at a grid of widths. A block's latency is their sum (the
branches run one after the other), a structure's is the fixed cost plus its blocks'.

Every number comes from a variant of the model built by `compact` (so it is exactly what
compaction produces) and timed interleaved with the dense model by the one timing loop:

- the depth-0 model (every block dropped; timm runs an empty block list): the fixed cost;
- every block at (0 heads, 0 neurons), i.e. two constant adds: `base_ms` = (its ms - fixed) / depth;
- every block at (h, 0) for h = 1..H: `head_ms[h]` = (its ms - all-(0, 0) ms) / depth;
- every block at (0, w) for w on the width grid: `mlp_ms` likewise.

A variant's ms is the median of its runs times (the dense model's median over the whole run) / (its
median in the variant's own rounds), so that slow phases of a shared machine cancel.

With the token axis (`tokens=True`, for budgets that may choose token merging) the block pieces are
measured again at a few token counts, and merging's own cost at a few r (`tokens.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..compaction import compact
from ..errors import ArtifactError, ConfigError
from ..io import ensure_dir, read_json, write_json
from ..models import get_record, input_size, is_compact, vit_layout
from ..masks import PruneMasks, head_view
from ..validate import flag, integer
from .backends import BackendOptions, make_backend, run_precision
from .environment import environment, package_version
from .sources import BenchModel, exporter_settings
from .timing import measure_pair
from .tokens import TokenAxis, TokenSlice, fewer_never_slower, merging, mlp_at, model_tokens, token_grid, with_tokens

# /2: the key names the backend's precision and the token axis; a /1 file is measured again.
SCHEMA = "vitcompact.latency-table/2"
DEFAULT_MLP_POINTS = 9
# The bench defaults; a table only predicts graphs built and optimised the same way.
GRAPH_OPTIMIZATION, ONNX_OPTIMIZE = "all", "off"
VERSION_KEYS = ("vitcompact", "torch", "timm", "onnx", "onnxruntime", "cpu")
GPU_KEYS = ("gpu", "tensorrt")
BACKEND_VERSION_KEYS = {"openvino": ("openvino", "nncf")}  # runtimes a backend adds to what it depends on
# What a cached table may hold: each number at most this many ms (a batch that takes over 16 minutes
# is no measurement), and its whole-model prediction within this factor of the dense model's time.
MAX_TABLE_MS = 1e6
TABLE_SPREAD = 3.0

Progress = Callable[[str], None]
Blocks = list[tuple[int, int]]  # (heads, MLP width) per block


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency (ms) of one model's parts at one backend, batch size and thread count."""

    key: dict[str, Any]              # what the numbers depend on (model, backend, batch, threads, versions)
    depth: int
    fixed_ms: float                  # everything outside the blocks
    base_ms: float                   # one block with both branches removed (its constant adds)
    head_ms: tuple[float, ...]       # one block's attention branch with h heads, h = 0..H; 0 at h = 0
    mlp_widths: tuple[int, ...]      # MLP widths measured, ascending, 0 first, the full width last
    mlp_ms: tuple[float, ...]        # one block's MLP branch at those widths; 0 at width 0
    dense_ms: float                  # the whole dense model, measured in the same run
    tokens: TokenAxis | None = None  # the same pieces at fewer tokens, and merging's cost (`tokens.py`)

    def __post_init__(self) -> None:
        if len(self.mlp_widths) != len(self.mlp_ms) or len(self.mlp_widths) < 2 or self.mlp_widths[0] != 0:
            raise ConfigError("a latency table needs MLP widths from 0 to the full width, one latency each")
        if list(self.mlp_widths) != sorted(set(self.mlp_widths)):
            raise ConfigError("latency table MLP widths must be strictly ascending")
        if len(self.head_ms) < 2:
            raise ConfigError("a latency table needs head counts from 0 to the full count")
        for piece in self.tokens.slices if self.tokens is not None else ():
            if (len(piece.head_ms), len(piece.mlp_ms)) != (len(self.head_ms), len(self.mlp_ms)):
                raise ConfigError(f"the latency table at {piece.count} tokens has another shape than at the "
                                  "dense count")

    @property
    def num_heads(self) -> int:
        return len(self.head_ms) - 1

    @property
    def hidden(self) -> int:
        return self.mlp_widths[-1]

    def mlp(self, width: int) -> float:
        """One block's MLP branch at `width` neurons, linear between the measured widths."""
        return mlp_at(self.mlp_widths, self.mlp_ms, width)

    def block(self, heads: int, width: int, tokens: tuple[int, int] | None = None) -> float:
        """One block at `heads` and `width`; at the dense token count, or at `tokens` (its attention's
        and its MLP's, interpolated on the token axis)."""
        if not 0 <= heads <= self.num_heads:
            raise ConfigError(f"head count {heads} is outside 0..{self.num_heads}")
        if tokens is None:
            return self.base_ms + self.head_ms[heads] + self.mlp(width)
        axis, (attn, mlp) = self.token_axis, tokens
        widths = self.mlp_widths
        return (axis.interpolate(lambda s: s.base_ms, self, (attn + mlp) / 2)
                + axis.interpolate(lambda s: s.head_ms[heads], self, attn)
                + axis.interpolate(lambda s: mlp_at(widths, s.mlp_ms, width), self, mlp))

    @property
    def token_axis(self) -> TokenAxis:
        if self.tokens is None:
            raise ConfigError("this latency table has no token axis; measure it with budget axes heads,mlp,tokens")
        return self.tokens

    def block_tokens(self, r: int) -> list[tuple[int, int] | None]:
        """Each block's (attention, MLP) tokens merging `r` per block; None (dense) at r = 0."""
        return [None] * self.depth if r == 0 else self.token_axis.block_tokens(self.depth, r)

    def predict(self, blocks: Sequence[tuple[int, int]], r: int = 0) -> float:
        """Latency of a structure given as (heads, MLP width) per block, merging `r` tokens per block
        (constant schedule; needs the token axis unless 0)."""
        if len(blocks) != self.depth:
            raise ConfigError(f"the latency table is for {self.depth} blocks, the structure has {len(blocks)}")
        if r == 0:
            return self.fixed_ms + sum(self.block(h, w) for h, w in blocks)
        tokens = self.block_tokens(r)
        return (self.fixed_ms + sum(self.block(h, w, t) for (h, w), t in zip(blocks, tokens))
                + self.token_axis.merge_cost(r))

    @property
    def floor_ms(self) -> float:
        """The least any structure can take: every block removed."""
        return self.fixed_ms + self.depth * self.base_ms

    @property
    def full_ms(self) -> float:
        """The whole model, as the table predicts it."""
        return self.predict([(self.num_heads, self.hidden)] * self.depth)

    @property
    def reference_ms(self) -> float:
        """The whole model as speed-ups are counted against it: measured (`dense_ms`, timed in the
        same run as the table), else predicted. The additive model over-predicts the whole model by
        a percent or two (its branches overlap a little), which a speed-up over the prediction
        would carry into every budget."""
        return self.dense_ms if self.dense_ms > 0 else self.full_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "head_ms": list(self.head_ms), "mlp_widths": list(self.mlp_widths),
                "mlp_ms": list(self.mlp_ms), "tokens": self.tokens.to_dict() if self.tokens is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        try:
            tokens = d.get("tokens")
            return cls(dict(d["key"]), int(d["depth"]), float(d["fixed_ms"]), float(d["base_ms"]),
                       tuple(float(v) for v in d["head_ms"]), tuple(int(v) for v in d["mlp_widths"]),
                       tuple(float(v) for v in d["mlp_ms"]), float(d["dense_ms"]),
                       TokenAxis.from_dict(tokens) if tokens is not None else None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"not a latency table: {e}") from None



@dataclass(frozen=True)
class TableTiming:
    """How each variant is timed against the dense model: rounds of the harness, capped by
    `seconds_per_variant` (both models together), never under `min_rounds`."""

    warmup: int = 3
    rounds: int = 50
    runs_per_round: int = 2
    min_rounds: int = 3
    seconds_per_variant: float = 4.0

    @property
    def time_budget_s(self) -> float:
        return self.seconds_per_variant


def block_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(depth, heads, head_dim, MLP width) of a dense ViT whose blocks all have the same shape."""
    if is_compact(model):
        raise ConfigError("a latency table is measured on the dense model; pass the model before compaction")
    blocks = vit_layout(model).blocks
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


def first_units_masks(model: nn.Module, blocks: Sequence[tuple[int, int]]) -> PruneMasks:
    """Masks keeping the first h heads and first w neurons of each block; which units are kept
    does not change latency."""
    masks = PruneMasks.ones(model)
    for layout, (heads, width) in zip(masks.layout.blocks, blocks, strict=True):
        for name, m in masks.block_masks(layout).items():
            if ".attn." in name:
                head_view(name, m, layout)[:, heads:] = False
            elif name.endswith("fc1.weight"):
                m[width:] = False
            else:
                m[:, width:] = False
    return masks


def timing_copy(model: nn.Module) -> nn.Module:
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


class Interleaved:
    """Times models against one loaded dense model on one backend, pair by pair (harness rounds)."""

    def __init__(self, dense: nn.Module, backend: str, batch: int, threads: int, timing: TableTiming,
                 seed: int, progress: Progress | None = None, precision: str | None = None):
        self.torch_threads = torch.get_num_threads()  # the torch backend pins threads process-wide
        self.backend = make_backend(backend, BackendOptions(threads, GRAPH_OPTIMIZATION, ONNX_OPTIMIZE, seed,
                                                            run_precision(backend, precision)))
        self.batch, self.config = batch, timing
        self.progress = progress
        self.dense = self.backend.load(BenchModel.of(dense))(batch)
        self.pairs: list[tuple[float, float]] = []  # (model median, dense median) per timed model

    def time(self, model: nn.Module, label: str) -> int:
        """Time `model` against the dense one; its index for `ms` and `pairs`."""
        run = self.backend.load(BenchModel.of(model))(self.batch)
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

    def __enter__(self) -> "Interleaved":
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.torch_threads)


def measure_table(model: nn.Module, backend: str = "ort-cpu", batch: int = 1, threads: int = 1,
                  round_to: int = 1, mlp_points: int | None = None, seed: int = 0,
                  progress: Progress | None = None, timing: TableTiming | None = None,
                  precision: str | None = None, tokens: bool = False) -> LatencyTable:
    """Measure `model`'s latency table on `backend` (at `precision` where the backend sets one) at
    `batch` images and `threads` threads (see the module docstring); MLP widths are multiples of
    `round_to`, `mlp_points` of them measured; with `tokens`, the token axis too."""
    key = cache_key(model, backend, batch, threads, round_to, mlp_points, precision, tokens)
    depth, heads, _, _ = block_shape(model)
    source, axis, widths = timing_copy(model), key["tokens"], key["mlp_widths"]
    counts, rs = (axis["counts"][:-1], axis["merge_r"]) if axis else ([], [])
    with Interleaved(source, backend, batch, threads, timing or TableTiming(), seed, progress, precision) as timer:
        timed = [_time_pieces(timer, source, widths, heads)]
        timed += [_time_pieces(timer, with_tokens(source, n), widths, heads, f" at {n} tokens") for n in counts]
        merged = [timer.time(merging(source, r), f"dense model merging r={r}") for r in rs]
        pieces = [_pieces_ms(timer, t, depth, heads, n) for t, n in zip(timed, [model_tokens(model)[0], *counts])]
        merged_ms, dense_ms = [timer.ms(i) for i in merged], timer.dense_ms
    fixed_ms, dense = pieces[0]
    table = LatencyTable(key, depth, fixed_ms, dense.base_ms, dense.head_ms, tuple(widths), dense.mlp_ms, dense_ms)
    if not axis:
        return table
    return _with_token_axis(table, [p for _, p in pieces[1:]], dict(zip(rs, merged_ms)), axis["prefix_tokens"])


def _with_token_axis(table: LatencyTable, low: Sequence[TokenSlice], merged_ms: dict[int, float],
                     prefix: int) -> LatencyTable:
    """`table` with its pieces at the `low` token counts, and merging's own cost at each r: what
    the dense model merging at r took (`merged_ms`) beyond the prediction for its token counts."""
    count = table.key["tokens"]["counts"][-1]
    dense = TokenSlice(count, table.base_ms, table.head_ms, table.mlp_ms)
    axis = TokenAxis(count, prefix, fewer_never_slower(low, dense), tuple(merged_ms), (0.0,) * len(merged_ms))
    free = dataclasses.replace(table, tokens=axis)
    full = [(table.num_heads, table.hidden)] * table.depth
    cost = tuple(max(0.0, ms - free.predict(full, r)) for r, ms in merged_ms.items())
    return dataclasses.replace(free, tokens=dataclasses.replace(axis, merge_ms=cost))


def _time_pieces(timer: Interleaved, source: nn.Module, widths: Sequence[int], heads: int,
                 where: str = "") -> list[int]:
    """Time the depth-0 model and every block at (0, 0), (h, 0) for h = 1..H and (0, w) for the
    measured widths; their indices in `timer`."""
    depth = len(source.blocks)
    shapes = [(0, 0)] + [(h, 0) for h in range(1, heads + 1)] + [(0, w) for w in widths[1:]]
    return [timer.time(_depth_zero(source), f"depth 0{where}")] + [
        timer.time(compact(source, first_units_masks(source, [(h, w)] * depth)),
                   f"every block at {h} heads, MLP width {w}{where}") for h, w in shapes]


def _pieces_ms(timer: Interleaved, timed: Sequence[int], depth: int, heads: int,
               count: int) -> tuple[float, TokenSlice]:
    """The fixed cost and one block's pieces (see the module docstring) from `_time_pieces`' timings."""
    fixed_ms, empty_ms, *rest = [timer.ms(i) for i in timed]
    # Noise can make a small difference negative; a branch never saves time by running.
    per_block = [max(0.0, (t - empty_ms) / depth) for t in rest]
    return fixed_ms, TokenSlice(count, max(0.0, (empty_ms - fixed_ms) / depth), _rising((0.0, *per_block[:heads])),
                                _rising((0.0, *per_block[heads:])))


def _rising(values: Sequence[float]) -> tuple[float, ...]:
    """`values` made non-decreasing (each the largest so far): more units never take less time, and
    noise that says otherwise would let the allocator buy time by keeping units."""
    return tuple(itertools.accumulate(values, max))


def versions(backend_on_gpu: bool = False, backend: str | None = None) -> dict[str, Any]:
    """Library versions and hardware a timing depends on (GPU ones only for a GPU backend, a
    runtime's own only for its backend)."""
    env = environment({})
    keys = VERSION_KEYS + (GPU_KEYS if backend_on_gpu else ())
    own = {k: package_version(k) for k in BACKEND_VERSION_KEYS.get(backend or "", ())}
    return {**{k: env[k] for k in keys}, **own, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _token_key(model: nn.Module, depth: int) -> dict[str, Any]:
    """The token axis's part of the key: the token counts and r values measured."""
    num_tokens, prefix = model_tokens(model)
    grid, counts = token_grid(num_tokens, depth, prefix)
    return {"counts": counts, "merge_r": grid, "prefix_tokens": prefix, "schedule": "constant"}


def cache_key(model: nn.Module, backend: str, batch: int, threads: int, round_to: int = 1,
              mlp_points: int | None = None, precision: str | None = None, tokens: bool = False) -> dict[str, Any]:
    """What a latency table depends on: the model's configuration, backend, the precision it runs
    at and its graph settings (the ONNX opset and graph the bench exports), batch, threads, the
    measured widths and token counts, and library versions and hardware."""
    depth, heads, head_dim, hidden = block_shape(model)
    integer("batch", batch, 1)
    integer("threads", threads, 1)
    flag("tokens", tokens)
    precision = run_precision(backend, precision)  # refuses a precision of a backend that sets none
    # Also refuses an unknown name, or a precision the backend does not have.
    on_gpu = make_backend(backend, BackendOptions(threads, precision=precision)).on_gpu
    source = get_record(model).source() or {}
    exported = exporter_settings()  # the backends export with the exporter's defaults
    config = {"architecture": source.get("architecture"), "model_args": source.get("model_args"),
              "embed_dim": model.embed_dim, "depth": depth, "num_heads": heads, "head_dim": head_dim,
              "hidden": hidden, "input_size": list(input_size(model)), "num_classes": model.num_classes}
    return {"schema": SCHEMA, "model": json.loads(json.dumps(config, default=str)),
            "backend": backend, "graph_optimization": GRAPH_OPTIMIZATION, "onnx_optimize": ONNX_OPTIMIZE,
            "opset": exported["opset"], "graph": exported["graph"],
            "precision": precision, "batch": batch, "threads": threads, "round_to": round_to,
            "mlp_widths": measured_widths(hidden, round_to, mlp_points),
            "tokens": _token_key(model, depth) if tokens else None, "versions": versions(on_gpu, backend)}


def default_cache_dir() -> Path:
    """`$VITCOMPACT_CACHE/latency`, else `~/.cache/vitcompact/latency`."""
    root = os.environ.get("VITCOMPACT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vitcompact") / "latency"


def cache_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.json"


def table_problem(table: LatencyTable, key: dict[str, Any]) -> str | None:
    """Why `table` cannot be the table of `key`'s model (None when it can): a shape other than the
    model's, a number that is not finite, negative or beyond `MAX_TABLE_MS`, a branch that gets
    faster with more units, or a whole-model prediction more than `TABLE_SPREAD` times off the dense
    model measured with it. A cached file that fails is measured again, never trusted."""
    model = key.get("model", {})
    if (table.depth, table.num_heads) != (model.get("depth"), model.get("num_heads")) \
            or list(table.mlp_widths) != list(key.get("mlp_widths", [])):
        return (f"is for {table.depth} blocks of {table.num_heads} heads and MLP widths {list(table.mlp_widths)}, "
                f"the model has {model.get('depth')} of {model.get('num_heads')} and {key.get('mlp_widths')}")
    tokens = key.get("tokens")
    measured = None if table.tokens is None else {"counts": [*table.tokens.counts, table.tokens.dense_tokens],
                                                  "merge_r": list(table.tokens.merge_r)}
    if measured != (None if tokens is None else {k: tokens.get(k) for k in ("counts", "merge_r")}):
        return f"has token counts and r {measured}, the key {tokens}"
    numbers = {"fixed_ms": [table.fixed_ms], "base_ms": [table.base_ms], "dense_ms": [table.dense_ms],
               "head_ms": list(table.head_ms), "mlp_ms": list(table.mlp_ms)}
    if table.tokens is not None:
        for piece in table.tokens.slices:
            numbers.update({f"{name} at {piece.count} tokens": v for name, v in piece.numbers().items()})
    problem = next(filter(None, (_numbers_problem(name, values) for name, values in numbers.items())), None)
    if problem is None and table.tokens is not None:  # merging's cost need not grow with r
        problem = _numbers_problem("merge_ms", table.tokens.merge_ms, rising=False)
    if problem is not None:
        return problem
    if table.dense_ms <= 0 or not 1 / TABLE_SPREAD <= table.full_ms / table.dense_ms <= TABLE_SPREAD:
        return (f"predicts {table.full_ms:.4g} ms for the whole model, measured at {table.dense_ms:.4g} ms "
                "in the same run")
    return None


def _numbers_problem(name: str, values: Sequence[float], rising: bool = True) -> str | None:
    """Why `values` cannot be latencies (that grow with units, if `rising`); None when they can."""
    bad = next((v for v in values if not (math.isfinite(v) and 0.0 <= v <= MAX_TABLE_MS)), None)
    if bad is not None:
        return f"holds {name} {bad!r}, not a latency in [0, {MAX_TABLE_MS:g}] ms"
    if rising and any(b < a for a, b in zip(values, values[1:])):
        return f"holds a {name} that falls as units are added ({', '.join(f'{v:.4g}' for v in values)})"
    return None


def _cached(path: Path, key: dict[str, Any]) -> tuple[LatencyTable | None, str | None]:
    """The table stored at `path` if its key is `key` and its numbers can be this model's; else None,
    with why when a file is there but cannot be used."""
    if not path.is_file():
        return None, None
    try:
        stored = read_json(path)
        if stored.get("key") != json.loads(json.dumps(key)):
            return None, "was stored for another model, backend or machine"
        table = LatencyTable.from_dict(stored["table"])
    except (ArtifactError, ConfigError, AttributeError, KeyError, TypeError) as e:
        return None, f"cannot be read ({e})"
    problem = table_problem(table, key)
    return (None, problem) if problem is not None else (table, None)


def _cache_problem(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache (None when it can), found before minutes of measuring: it
    cannot be made (a file stands in the way) or written (a read-only mount)."""
    try:
        ensure_dir(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except ArtifactError as e:
        return str(e)
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    return None


def latency_table(model: nn.Module, backend: str = "ort-cpu", batch: int = 1, threads: int = 1,
                  round_to: int = 1, mlp_points: int | None = None, cache_dir: str | os.PathLike | None = None,
                  refresh: bool = False, progress: Progress | None = None, precision: str | None = None,
                  tokens: bool = False) -> LatencyTable:
    """`measure_table`, cached as JSON under `cache_dir` (default `default_cache_dir()`) by a hash
    of `cache_key`; a stored table is used only if its key equals the current one and its numbers
    pass `table_problem` (otherwise it is measured again, with a note to `progress`). A cache folder
    that cannot be written is found before measuring: the table is then measured and not kept.
    `precision` is the backend's where it sets one (openvino); `tokens` adds the token axis."""
    say = progress or (lambda line: None)
    key = cache_key(model, backend, batch, threads, round_to, mlp_points, precision, tokens)
    path = cache_path(key, cache_dir)
    table, stale = (None, None) if refresh else _cached(path, key)
    if table is not None:
        say(f"latency table from {path}")
        return table
    if stale is not None:
        say(f"latency table {path} {stale}: stale, measuring it again")
    unusable = _cache_problem(path.parent)
    if unusable is not None:
        say(f"latency cache not usable ({unusable}); measuring without caching")
    table = measure_table(model, backend, batch, threads, round_to, mlp_points, progress=progress,
                          precision=precision, tokens=tokens)
    if unusable is None:
        try:
            write_json(path, {"key": key, "table": table.to_dict()})
        except ArtifactError as e:
            say(f"latency table not cached ({e})")
    return table
