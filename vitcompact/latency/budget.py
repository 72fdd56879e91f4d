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

With the token axis (`axes="heads,mlp,tokens"`, issue 28) the allocator may also merge `r` tokens
per block (ToMe, constant schedule): it allocates heads and widths at each r of the table's grid
(and at 0), with each block's costs at its token counts, and keeps the allocation that loses the
least importance, ties to the smaller r. Merging is priced in the same importance: a block whose
attention (MLP) sees a share s of the dense tokens keeps s of the importance its kept heads (neurons)
hold, as if each token carried an even share of the block's work. That is a conservative price (ToMe
merges the most similar tokens first): merging is chosen where pruning alone would have to take units
the criterion ranks above average, or whole blocks.
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
from ..validate import flag, in_range, integer, one_of
from .backends import run_precision
from .environment import check_threads
from .table import LatencyTable, Progress, latency_table

TARGET_KINDS = ("speedup", "ms")
MAX_DEPLOY_BATCH = 4096  # the exporter's verification limit; a larger batch is an allocation, not a deployment
BLOCK_REMOVAL = ("last-resort", "free", "never")
BUDGET_AXES = ("heads,mlp", "heads,mlp,tokens")  # what the allocator may choose: heads and widths, and r


def budget_axes(value: object) -> str:
    """`value` as one of `BUDGET_AXES` (names in any order, spaces allowed); else a one-line error."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else None
    for axes in BUDGET_AXES:
        if names is not None and len(names) == len(set(names)) and set(names) == set(axes.split(",")):
            return axes
    raise ConfigError(f"budget axes must be heads,mlp or heads,mlp,tokens (tokens: the budget chooses the token "
                      f"merging r), got {value!r}")


@dataclass(frozen=True)
class LatencyBudget:
    """A latency budget on a measured table: `target` is a speed-up over the dense model
    (`kind="speedup"`) or milliseconds (`kind="ms"`). `budget_ms` is what the allocator meets."""

    table: LatencyTable
    target: float
    kind: str = "speedup"
    block_removal: str = "last-resort"  # when the allocator may remove whole blocks (module docstring)
    tokens: bool = False                # whether the allocator may merge tokens (needs the table's token axis)

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ConfigError(f"unknown budget kind {self.kind!r}; choose one of: {', '.join(TARGET_KINDS)}")
        one_of("block removal", self.block_removal, BLOCK_REMOVAL)
        if flag("tokens", self.tokens) and self.table.tokens is None:
            raise ConfigError("a budget that merges tokens needs a latency table with a token axis; measure it with "
                              "budget axes heads,mlp,tokens")
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

    @property
    def merge_r(self) -> tuple[int, ...]:
        """The tokens merged per block the allocator may choose: 0, and the table's grid with `tokens`."""
        return (0, *self.table.token_axis.merge_r) if self.tokens else (0,)

    def check_reachable(self, prune_heads: bool, prune_mlp: bool, round_to: int = 1, free: bool = False) -> None:
        """Refuse a budget the allocator cannot meet, before any pruning: below what the model takes
        with every pruned branch at its last head and narrowest width (at none if `free`: a model that
        arrives pruned holds units scoring 0, which go freely), or every block removed where whole
        blocks may go."""
        if prune_heads and prune_mlp and self.block_removal != "never":
            return  # every block can go, and the floor was checked on construction
        heads = (0 if free else 1) if prune_heads else self.table.num_heads
        width = (0 if free else min(round_to, self.table.hidden)) if prune_mlp else self.table.hidden
        least = min(self.table.predict([(heads, width)] * self.table.depth, r) for r in self.merge_r)
        if self.budget_ms < least - 1e-9:
            hint = ("remove whole blocks (block removal last-resort), " if prune_heads and prune_mlp
                    else "prune both heads and MLP, ")
            raise ConfigError(f"the budget {self.budget_ms:.3f} ms cannot be met by removing the prunable units "
                              f"(the least is {least:.3f} ms); {hint}or ask for less")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "budget_ms": self.budget_ms,
                "block_removal": self.block_removal, "tokens": self.tokens, "table": self.table.to_dict()}


@dataclass(frozen=True)
class BudgetRequest:
    """What a user asks: `target_speedup` or `latency_ms` (exactly one), at `deploy_batch` on
    `backend` (at `precision`, where the backend sets one) with `threads` intra-op threads; `axes`
    says whether the budget may also choose token merging."""

    target_speedup: float | None = knob(None, "Prune to this measured speed-up instead of ratios.")
    latency_ms: float | None = knob(None, "Prune to this latency (ms per batch) instead of ratios.")
    deploy_batch: int = knob(1, "Batch size the budget is for.")
    backend: str = knob("ort-cpu", "Backend the budget is for (ort-cpu, torch, ...).")
    threads: int = knob(1, "Intra-op threads the budget is for.")
    block_removal: str = knob("last-resort", "When the budget may remove whole blocks: last-resort (only when "
                                             "widths cannot meet it), free, never.")
    axes: str = knob("heads,mlp", "What the budget chooses: heads,mlp (heads and MLP widths per block) or "
                                  "heads,mlp,tokens (also the token merging r, measured at a few token counts).",
                     flag="--budget-axes")
    precision: str | None = knob(None, "Precision the budget is for, on a backend that sets one (openvino: f32, "
                                       "bf16, int8; default f32).", flag="--budget-precision")

    def __post_init__(self) -> None:
        one_of("block removal", self.block_removal, BLOCK_REMOVAL)
        object.__setattr__(self, "axes", budget_axes(self.axes))  # one spelling of each choice
        run_precision(self.backend, self.precision)  # a precision only for a backend that sets one
        if (self.target_speedup is None) == (self.latency_ms is None):
            raise ConfigError("a latency budget takes exactly one of a target speed-up or a latency in ms")
        if self.target_speedup is not None:
            in_range("target speed-up", self.target_speedup, 1.0, low_open=True)
        if self.latency_ms is not None:
            in_range("latency budget (ms)", self.latency_ms, 0.0, low_open=True)
        integer("deploy_batch (--deploy-batch)", self.deploy_batch, 1, MAX_DEPLOY_BATCH)
        integer("threads (--threads)", self.threads, 1)

    @property
    def merges_tokens(self) -> bool:
        """Whether the budget may choose the token merging r (axes heads,mlp,tokens)."""
        return "tokens" in self.axes.split(",")

    def budget(self, model: nn.Module, round_to: int = 1, progress: Progress | None = None,
               cache_dir: str | os.PathLike | None = None) -> LatencyBudget:
        """The budget on `model`'s latency table at this deployment (measured, or from the cache)."""
        check_threads(self.threads)  # measured here: more threads than CPUs would time contention
        table = latency_table(model, self.backend, self.deploy_batch, self.threads, round_to=round_to,
                              cache_dir=cache_dir, progress=progress, precision=self.precision,
                              tokens=self.merges_tokens)
        if self.target_speedup is not None:
            return LatencyBudget(table, self.target_speedup, "speedup", self.block_removal, self.merges_tokens)
        return LatencyBudget(table, self.latency_ms, "ms", self.block_removal, self.merges_tokens)


@dataclass
class Allocation:
    """Kept units per block (sorted indices, None where the branch is not pruned), the tokens merged
    per block (`r`, constant schedule; 0: none) and the latency the table predicts for them."""

    heads: list[torch.Tensor | None]
    neurons: list[torch.Tensor | None]
    predicted_ms: float
    steps: list[tuple[str, int, float, float]] = field(default_factory=list)  # (kind, block, importance, saved ms)
    r: int = 0
    merge_lost: float = 0.0  # the importance merging takes of the units kept (module docstring)

    @property
    def lost(self) -> float:
        """The importance lost: the units removed, and what merging takes of those kept."""
        return sum(step[2] for step in self.steps) + self.merge_lost


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores as shares of their block's total. A block whose units all score 0 (removed in an
    earlier state) has nothing to lose: its units cost nothing to remove, so they go first."""
    s = scores.double().clamp_min(0)
    total = s.sum()
    return s / total if total > 0 else torch.zeros_like(s)


def allocate(head_scores: Sequence[torch.Tensor | None], neuron_scores: Sequence[torch.Tensor | None],
             table: LatencyTable, budget_ms: float, round_to: int = 1,
             block_removal: str = "last-resort", merge_r: Sequence[int] = (0,)) -> Allocation:
    """The kept heads and neurons of every block that keep the most importance within `budget_ms`
    (see the module's docstring). A branch whose scores are None is left whole. Neurons go
    `round_to` at a time, so widths stay multiples of it (or the full width). `block_removal` says
    when a whole block may go: "last-resort", "free" or "never". `merge_r`: the tokens merged per
    block to try (r > 0 needs the table's token axis); the allocation that loses the least
    importance is kept, ties to the smaller r."""
    one_of("block removal", block_removal, BLOCK_REMOVAL)
    if len(head_scores) != table.depth or len(neuron_scores) != table.depth:
        raise ConfigError(f"scores for {len(head_scores)} blocks, the latency table has {table.depth}")
    if budget_ms < table.floor_ms - 1e-9:
        raise ConfigError(f"the budget {budget_ms:.3f} ms is below the {table.floor_ms:.3f} ms the model takes "
                          "with every block removed (its fixed cost); ask for less")
    best, refused = None, None
    for r in sorted(set(merge_r)):
        try:
            found = _Allocator(head_scores, neuron_scores, table, round_to, block_removal, r).run(budget_ms)
        except ConfigError as e:  # this r cannot meet the budget; a larger one may
            refused = e
            continue
        if best is None or found.lost < best.lost - 1e-12:
            best = found
    if best is None:
        raise refused
    return best


class _Allocator:
    """One allocation at `r` tokens merged per block: from the whole model, the step that loses
    the least importance per ms saved, until the prediction is within the budget."""

    def __init__(self, head_scores: Sequence[torch.Tensor | None], neuron_scores: Sequence[torch.Tensor | None],
                 table: LatencyTable, round_to: int, block_removal: str, r: int):
        self.table, self.round_to, self.block_removal, self.r = table, round_to, block_removal, r
        attn_ms, mlp_ms = table.head_ms[-1], table.mlp_ms[-1]
        self.attn_weight = attn_ms / max(1e-12, attn_ms + mlp_ms)
        self.head_order = [None if s is None else torch.argsort(_normalised(s), stable=True) for s in head_scores]
        self.neuron_order = [None if s is None else torch.argsort(_normalised(s), stable=True) for s in neuron_scores]
        self.head_imp = [None if s is None else _normalised(s) * self.attn_weight for s in head_scores]
        self.neuron_imp = [None if s is None else _normalised(s) * (1.0 - self.attn_weight) for s in neuron_scores]
        self.heads = [table.num_heads if s is None else s.numel() for s in head_scores]
        self.widths = [table.hidden if s is None else s.numel() for s in neuron_scores]
        for b in range(table.depth):
            if self.heads[b] != table.num_heads or self.widths[b] != table.hidden:
                raise ConfigError(f"block {b} has {self.heads[b]} heads and {self.widths[b]} neurons, the latency "
                                  f"table {table.num_heads} and {table.hidden}")
        self.removed_heads, self.removed_neurons = [0] * table.depth, [0] * table.depth
        self.tokens = table.block_tokens(r)
        self.steps: list[tuple[str, int, float, float]] = []

    def block_ms(self, b: int, heads: int, width: int) -> float:
        return self.table.block(heads, width, self.tokens[b])

    def predicted(self) -> float:
        return self.table.predict(list(zip(self.heads, self.widths)), self.r)

    def next_width(self, w: int) -> int:
        return w - (w % self.round_to or self.round_to) if w > 0 else 0

    def unit_steps(self, need: float, best: tuple | None) -> tuple | None:
        """The best of `best` and every block's next head or next `round_to` neurons."""
        for b in range(self.table.depth):
            heads, width = self.heads[b], self.widths[b]
            if self.head_order[b] is not None and heads > 0:
                lost = float(self.head_imp[b][self.head_order[b][self.removed_heads[b]]])
                if heads > 1 or lost == 0.0:
                    saved = self.block_ms(b, heads, width) - self.block_ms(b, heads - 1, width)
                    best = _better(best, ("head", b, lost, saved), need)
            if self.neuron_order[b] is not None and width > 0:
                narrower = self.next_width(width)
                start = self.removed_neurons[b]
                lost = float(self.neuron_imp[b][self.neuron_order[b][start:start + width - narrower]].sum())
                if narrower > 0 or lost == 0.0:
                    saved = self.block_ms(b, heads, width) - self.block_ms(b, heads, narrower)
                    best = _better(best, ("mlp", b, lost, saved), need)
        return best

    def kept_importance(self, b: int) -> tuple[float, float]:
        """The importance block b's kept heads and kept neurons hold (a whole branch: its weight)."""
        attn = (self.attn_weight if self.head_imp[b] is None
                else float(self.head_imp[b][self.head_order[b][self.removed_heads[b]:]].sum()))
        mlp = (1.0 - self.attn_weight if self.neuron_imp[b] is None
               else float(self.neuron_imp[b][self.neuron_order[b][self.removed_neurons[b]:]].sum()))
        return attn, mlp

    def block_steps(self, need: float, best: tuple | None) -> tuple | None:
        """The best of `best` and removing a whole block (both branches pruned, something left)."""
        for b in range(self.table.depth):
            heads, neurons = self.head_order[b], self.neuron_order[b]
            if heads is not None and neurons is not None and (self.heads[b] or self.widths[b]):
                lost = float(self.head_imp[b][heads[self.removed_heads[b]:]].sum()
                             + self.neuron_imp[b][neurons[self.removed_neurons[b]:]].sum())
                saved = self.block_ms(b, self.heads[b], self.widths[b]) - self.block_ms(b, 0, 0)
                best = _better(best, ("block", b, lost, saved), need)
        return best

    def take(self, step: tuple) -> None:
        kind, b, _, _ = step
        if kind == "block":
            self.removed_heads[b] += self.heads[b]
            self.removed_neurons[b] += self.widths[b]
            self.heads[b] = self.widths[b] = 0
        elif kind == "head":
            self.heads[b] -= 1
            self.removed_heads[b] += 1
        else:
            narrower = self.next_width(self.widths[b])
            self.removed_neurons[b] += self.widths[b] - narrower
            self.widths[b] = narrower
        self.steps.append(step)

    def merge_lost(self) -> float:
        """What merging takes of the kept units: each branch's kept importance times the share of the
        dense tokens it no longer sees."""
        if self.r == 0:
            return 0.0
        dense, lost = self.table.token_axis.dense_tokens, 0.0
        for b, (attn_tokens, mlp_tokens) in enumerate(self.tokens):
            attn, mlp = self.kept_importance(b)
            lost += attn * (1 - attn_tokens / dense) + mlp * (1 - mlp_tokens / dense)
        return lost

    def run(self, budget_ms: float) -> Allocation:
        current = self.predicted()
        while current > budget_ms + 1e-9:
            best = self.unit_steps(current - budget_ms, None)
            if self.block_removal == "free" or (self.block_removal == "last-resort" and best is None):
                best = self.block_steps(current - budget_ms, best)
            if best is None:
                hint = ("remove whole blocks (block removal last-resort), " if self.block_removal == "never"
                        else "prune both heads and MLP, ")
                raise ConfigError(f"the budget {budget_ms:.3f} ms cannot be met by removing the prunable units "
                                  f"(the least is {current:.3f} ms); {hint}or ask for less")
            self.take(best)
            current = self.predicted()
        kept_heads = [None if o is None else torch.sort(o[self.removed_heads[b]:]).values
                      for b, o in enumerate(self.head_order)]
        kept_neurons = [None if o is None else torch.sort(o[self.removed_neurons[b]:]).values
                        for b, o in enumerate(self.neuron_order)]
        return Allocation(kept_heads, kept_neurons, current, self.steps, self.r, self.merge_lost())


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
