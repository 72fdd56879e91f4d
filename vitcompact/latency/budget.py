"""Pruning to a latency budget: a user's request (`BudgetRequest`: a speed-up or milliseconds, at a
deployment batch size, backend and thread count), made into a `LatencyBudget` on the model's
measured latency table (`table.py`), and the allocator that picks per-block head counts and MLP
widths under it.

The allocator starts from the whole model and removes, one step at a time, the unit whose loss of
importance per millisecond saved is smallest, until the predicted latency is within the budget:
a step is a block's least important head, or its least important `round_to` neurons (the next
width down the grid). Importance is the criterion's score normalised per block and branch, and
each branch weighted by its share of the dense block's latency: a block's heads together weigh
what its attention costs, its neurons what its MLP costs. So an average unit loses as much
importance as it saves time, everywhere, and the allocator removes the units the criterion
ranks below their branch's average first, in whichever block and branch they are. (Weighting
both branches alike instead makes attention, the costlier branch per unit of a magnitude score,
go first: measured on Fashion-MNIST it removed every head of every block and left a model at
chance.) A branch keeps at least one unit while its block stays: its last head (or last
neurons) would take the whole branch, and with it all of the block's token mixing (or
its MLP), for the price of one unit; instead the whole block is a step of its own, losing all
the importance it still holds. A block so removed is a constant add (whole-block removal).
Units that score 0 (removed in an earlier state) go first and freely, the last ones too.

When whole blocks may go is `block_removal`. "last-resort" (the default): only once no block can
lose another head or neurons, so depth goes only for budgets that widths cannot meet. "free": a
whole block competes with single units at every step. "never": never; such budgets are refused.
Why the default: per-block normalised scores price a whole block at the importance its remaining
units still hold, an average, while the next unit of a thinned branch is priced at the margin,
so "free" removes blocks early. Measured on Fashion-MNIST (RSST at 2.1x, 3 seeds, README "Prune
to a latency budget"), that lost to the uniform cut on validation and test on every seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import torch.nn as nn

from ..errors import ConfigError
from ..knobs import knob
from ..validate import in_range, integer, one_of
from .environment import check_threads
from .table import LatencyTable, Progress, latency_table

TARGET_KINDS = ("speedup", "ms")
MAX_DEPLOY_BATCH = 4096  # the exporter's verification limit; a larger batch is an allocation, not a deployment
BLOCK_REMOVAL = ("last-resort", "free", "never")


@dataclass(frozen=True)
class LatencyBudget:
    """A latency budget on a measured table: `target` is a speed-up over the dense model
    (`kind="speedup"`) or milliseconds (`kind="ms"`). `budget_ms` is what the allocator meets."""

    table: LatencyTable
    target: float
    kind: str = "speedup"
    block_removal: str = "last-resort"  # when the allocator may remove whole blocks (module docstring)

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ConfigError(f"unknown budget kind {self.kind!r}; choose one of: {', '.join(TARGET_KINDS)}")
        one_of("block removal", self.block_removal, BLOCK_REMOVAL)
        in_range("target speed-up" if self.kind == "speedup" else "latency budget (ms)", self.target, 0.0,
                 low_open=True)
        if self.budget_ms < self.table.floor_ms:
            what = f"a {self.target:g}x speed-up" if self.kind == "speedup" else f"{self.target:g} ms"
            raise ConfigError(f"{what} asks for {self.budget_ms:.3f} ms, below the {self.table.floor_ms:.3f} ms "
                              "the model takes with every block removed (its fixed cost); ask for less")

    @property
    def budget_ms(self) -> float:
        """The budget in ms; a speed-up is taken over the whole dense model (`reference_ms`)."""
        return self.table.reference_ms / self.target if self.kind == "speedup" else self.target

    def at_state(self, state: int, states: int) -> float:
        """The budget of state s of S: the latency falls geometrically from the whole model's to
        the budget, which the last state meets exactly."""
        if state >= states:
            return self.budget_ms
        start = self.table.reference_ms
        return start * (self.budget_ms / start) ** (state / states)

    def check_reachable(self, prune_heads: bool, prune_mlp: bool, round_to: int = 1, free: bool = False) -> None:
        """Refuse a budget the allocator cannot meet, before any pruning: below what the model takes
        with every pruned branch at its last head and narrowest width (at none if `free`: a model that
        arrives pruned holds units scoring 0, which go freely), or every block removed where whole
        blocks may go."""
        if prune_heads and prune_mlp and self.block_removal != "never":
            return  # every block can go, and the floor was checked on construction
        heads = (0 if free else 1) if prune_heads else self.table.num_heads
        width = (0 if free else min(round_to, self.table.hidden)) if prune_mlp else self.table.hidden
        least = self.table.predict([(heads, width)] * self.table.depth)
        if self.budget_ms < least - 1e-9:
            hint = ("remove whole blocks (block removal last-resort), " if prune_heads and prune_mlp
                    else "prune both heads and MLP, ")
            raise ConfigError(f"the budget {self.budget_ms:.3f} ms cannot be met by removing the prunable units "
                              f"(the least is {least:.3f} ms); {hint}or ask for less")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "budget_ms": self.budget_ms,
                "block_removal": self.block_removal, "table": self.table.to_dict()}


@dataclass(frozen=True)
class BudgetRequest:
    """What a user asks: `target_speedup` or `latency_ms` (exactly one), at `deploy_batch` on
    `backend` with `threads` intra-op threads."""

    target_speedup: float | None = knob(None, "Prune to this measured speed-up instead of ratios.")
    latency_ms: float | None = knob(None, "Prune to this latency (ms per batch) instead of ratios.")
    deploy_batch: int = knob(1, "Batch size the budget is for.")
    backend: str = knob("ort-cpu", "Backend the budget is for (ort-cpu, torch, ...).")
    threads: int = knob(1, "Intra-op threads the budget is for.")
    block_removal: str = knob("last-resort", "When the budget may remove whole blocks: last-resort (only when "
                                             "widths cannot meet it), free, never.")

    def __post_init__(self) -> None:
        one_of("block removal", self.block_removal, BLOCK_REMOVAL)
        if (self.target_speedup is None) == (self.latency_ms is None):
            raise ConfigError("a latency budget takes exactly one of a target speed-up or a latency in ms")
        if self.target_speedup is not None:
            in_range("target speed-up", self.target_speedup, 1.0, low_open=True)
        if self.latency_ms is not None:
            in_range("latency budget (ms)", self.latency_ms, 0.0, low_open=True)
        integer("deploy_batch (--deploy-batch)", self.deploy_batch, 1, MAX_DEPLOY_BATCH)
        integer("threads (--threads)", self.threads, 1)

    def budget(self, model: nn.Module, round_to: int = 1, progress: Progress | None = None,
               cache_dir: str | os.PathLike | None = None) -> LatencyBudget:
        """The budget on `model`'s latency table at this deployment (measured, or from the cache)."""
        check_threads(self.threads)  # measured here: more threads than CPUs would time contention
        table = latency_table(model, self.backend, self.deploy_batch, self.threads, round_to=round_to,
                              cache_dir=cache_dir, progress=progress)
        if self.target_speedup is not None:
            return LatencyBudget(table, self.target_speedup, "speedup", self.block_removal)
        return LatencyBudget(table, self.latency_ms, "ms", self.block_removal)


@dataclass
class Allocation:
    """Kept units per block (sorted indices, None where the branch is not pruned) and the latency
    the table predicts for them."""

    heads: list[torch.Tensor | None]
    neurons: list[torch.Tensor | None]
    predicted_ms: float
    steps: list[tuple[str, int, float, float]] = field(default_factory=list)  # (kind, block, importance, saved ms)


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores as shares of their block's total. A block whose units all score 0 (removed in an
    earlier state) has nothing to lose: its units cost nothing to remove, so they go first."""
    s = scores.double().clamp_min(0)
    total = s.sum()
    return s / total if total > 0 else torch.zeros_like(s)


def allocate(head_scores: Sequence[torch.Tensor | None], neuron_scores: Sequence[torch.Tensor | None],
             table: LatencyTable, budget_ms: float, round_to: int = 1,
             block_removal: str = "last-resort") -> Allocation:
    """The kept heads and neurons of every block that keep the most importance within `budget_ms`
    (see the module's docstring). A branch whose scores are None is left whole. Neurons go
    `round_to` at a time, so widths stay multiples of it (or the full width). `block_removal` says
    when a whole block may go: "last-resort", "free" or "never"."""
    one_of("block removal", block_removal, BLOCK_REMOVAL)
    depth = table.depth
    if len(head_scores) != depth or len(neuron_scores) != depth:
        raise ConfigError(f"scores for {len(head_scores)} blocks, the latency table has {depth}")
    if budget_ms < table.floor_ms - 1e-9:
        raise ConfigError(f"the budget {budget_ms:.3f} ms is below the {table.floor_ms:.3f} ms the model takes "
                          "with every block removed (its fixed cost); ask for less")
    attn_ms, mlp_ms = table.head_ms[-1], table.mlp_ms[-1]
    attn_weight = attn_ms / max(1e-12, attn_ms + mlp_ms)
    head_order = [None if s is None else torch.argsort(_normalised(s), stable=True) for s in head_scores]
    neuron_order = [None if s is None else torch.argsort(_normalised(s), stable=True) for s in neuron_scores]
    head_imp = [None if s is None else _normalised(s) * attn_weight for s in head_scores]
    neuron_imp = [None if s is None else _normalised(s) * (1.0 - attn_weight) for s in neuron_scores]
    heads = [table.num_heads if s is None else s.numel() for s in head_scores]
    widths = [table.hidden if s is None else s.numel() for s in neuron_scores]
    for b in range(depth):
        if heads[b] != table.num_heads or widths[b] != table.hidden:
            raise ConfigError(f"block {b} has {heads[b]} heads and {widths[b]} neurons, the latency table "
                              f"{table.num_heads} and {table.hidden}")
    removed_heads, removed_neurons = [0] * depth, [0] * depth

    def next_width(w: int) -> int:
        return w - (w % round_to or round_to) if w > 0 else 0

    steps: list[tuple[str, int, float, float]] = []
    current = table.predict(list(zip(heads, widths)))
    while current > budget_ms + 1e-9:
        need, best = current - budget_ms, None
        for b in range(depth):
            if head_order[b] is not None and heads[b] > 0:
                lost = float(head_imp[b][head_order[b][removed_heads[b]]])
                if heads[b] > 1 or lost == 0.0:
                    saved = table.block(heads[b], widths[b]) - table.block(heads[b] - 1, widths[b])
                    best = _better(best, ("head", b, lost, saved), need)
            if neuron_order[b] is not None and widths[b] > 0:
                narrower = next_width(widths[b])
                drop = neuron_order[b][removed_neurons[b]:removed_neurons[b] + widths[b] - narrower]
                lost = float(neuron_imp[b][drop].sum())
                if narrower > 0 or lost == 0.0:
                    saved = table.block(heads[b], widths[b]) - table.block(heads[b], narrower)
                    best = _better(best, ("mlp", b, lost, saved), need)
        if block_removal == "free" or (block_removal == "last-resort" and best is None):
            for b in range(depth):
                if head_order[b] is not None and neuron_order[b] is not None and (heads[b] or widths[b]):
                    lost = float(head_imp[b][head_order[b][removed_heads[b]:]].sum()
                                 + neuron_imp[b][neuron_order[b][removed_neurons[b]:]].sum())
                    saved = table.block(heads[b], widths[b]) - table.block(0, 0)
                    best = _better(best, ("block", b, lost, saved), need)
        if best is None:
            hint = ("remove whole blocks (block removal last-resort), " if block_removal == "never"
                    else "prune both heads and MLP, ")
            raise ConfigError(f"the budget {budget_ms:.3f} ms cannot be met by removing the prunable units "
                              f"(the least is {current:.3f} ms); {hint}or ask for less")
        kind, b, lost, saved = best
        if kind == "block":
            removed_heads[b] += heads[b]
            removed_neurons[b] += widths[b]
            heads[b] = widths[b] = 0
        elif kind == "head":
            heads[b] -= 1
            removed_heads[b] += 1
        else:
            narrower = next_width(widths[b])
            removed_neurons[b] += widths[b] - narrower
            widths[b] = narrower
        steps.append(best)
        current = table.predict(list(zip(heads, widths)))
    kept_heads = [None if o is None else torch.sort(o[removed_heads[b]:]).values for b, o in enumerate(head_order)]
    kept_neurons = [None if o is None else torch.sort(o[removed_neurons[b]:]).values
                    for b, o in enumerate(neuron_order)]
    return Allocation(kept_heads, kept_neurons, current, steps)


def _better(best: tuple | None, candidate: tuple, need: float) -> tuple:
    """The step that loses the least importance per ms saved, counting no more saving than is
    still `need`ed (so a large step, such as a whole block, does not win near the budget by what
    it would overshoot); a step that saves nothing (within the table's noise) only when nothing
    else is left. Ties keep the earlier block, heads first."""
    def cost(step: tuple) -> float:
        _, _, lost, saved = step
        return lost / min(saved, need) if saved > 1e-12 else math.inf
    if best is None:
        return candidate
    c_new, c_old = cost(candidate), cost(best)
    if c_new < c_old or (math.isinf(c_new) and math.isinf(c_old) and candidate[3] > best[3]):
        return candidate
    return best
