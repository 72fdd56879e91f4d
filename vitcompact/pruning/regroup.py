"""Regroup element masks into quasi-structured head/neuron masks, and the Refill entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..validate import integer, one_of, ratio
from ..latency.budget import Allocation, LatencyBudget, allocate
from .criteria import CRITERIA, Criterion, ScoreContext, on_one_scale, score_units
from ..masks import PruneMasks, head_view
from .selection import SELECTION_MODES, select_units

TARGETS = ("head", "mlp", "both")


@dataclass
class RegroupConfig:
    """How `regroup` turns element masks into whole heads and neurons.

    `target` chooses what is pruned (`head`, `mlp` or `both`); the other part gets all-ones masks,
    so its weights are left untouched. Units are scored with `criteria`, a name in `CRITERIA` or a
    callable of the criterion signature (data-driven ones score `num_batches` calibration batches),
    and selected per `mode` keeping at least `min_keep` per block (see `selection`). `round_to`
    rounds kept MLP widths up to a multiple.
    With a `budget` (`LatencyBudget`), the ratios, `mode` and `min_keep` give way to the latency
    allocator (`budget.allocate`): per-block head counts and widths that keep the most importance
    within `budget_ms` (default: the budget's own; the pruning loop sets each state's), and the
    tokens merged per block where the budget may choose them (`regroup_with_allocation` says which).
    """

    target: str = "both"
    head_ratio: float = 0.0
    mlp_ratio: float = 0.0
    criteria: str | Criterion = "magnitude"
    mode: str = "layer-wise"
    min_keep: int = 1
    round_to: int = 1
    num_batches: int = 8
    budget: LatencyBudget | None = None
    budget_ms: float | None = None

    def __post_init__(self) -> None:
        one_of("target", self.target, TARGETS)
        self.head_ratio = ratio("head_ratio", self.head_ratio)
        self.mlp_ratio = ratio("mlp_ratio", self.mlp_ratio)
        if isinstance(self.criteria, str):
            CRITERIA.get(self.criteria)
        elif not callable(self.criteria):
            raise ConfigError(f"criteria must be one of {', '.join(CRITERIA.names())} or a callable "
                              f"(model, masks, ScoreContext) -> scores, got {self.criteria!r}")
        one_of("selection mode", self.mode, SELECTION_MODES)
        integer("min_keep", self.min_keep, 0)
        integer("round_to", self.round_to, 1)
        integer("num_batches", self.num_batches, 1)
        if self.budget is not None and not isinstance(self.budget, LatencyBudget):
            raise ConfigError(f"budget must be a LatencyBudget, got {type(self.budget).__name__}")
        if self.budget_ms is not None and self.budget is None:
            raise ConfigError("budget_ms needs a budget (its latency table)")


def regroup(model: nn.Module, masks: PruneMasks, config: RegroupConfig | None = None, *,
            data: Iterable[Any] | None = None, device: torch.device | str | None = None) -> PruneMasks:
    """Quasi-structured masks from element masks: whole heads and neurons kept or removed, as
    `config` says. Scores come from the masked model on `device`; data-driven criteria need `data`,
    an iterable of (images, labels) batches."""
    return regroup_with_allocation(model, masks, config, data=data, device=device)[0]


def regroup_with_allocation(model: nn.Module, masks: PruneMasks, config: RegroupConfig | None = None, *,
                            data: Iterable[Any] | None = None, device: torch.device | str | None = None,
                            ) -> tuple[PruneMasks, Allocation | None]:
    """`regroup`, and under a budget the allocation behind its masks (its `r`: the tokens the
    budget merges per block, 0 unless the budget may choose them); None without a budget."""
    config = config or RegroupConfig()
    masks.check_model(model)
    scores = score_units(model, masks, config.criteria, ScoreContext(data, config.num_batches, device))
    heads = neurons = allocation = None
    if config.budget is not None:
        budget_ms = config.budget_ms if config.budget_ms is not None else config.budget.budget_ms
        allocation = allocate([s[0] if config.target != "mlp" else None for s in scores],
                              [s[1] if config.target != "head" else None for s in scores],
                              config.budget.table, budget_ms, config.round_to, config.budget.block_removal,
                              config.budget.merge_r)
        heads = allocation.heads if config.target != "mlp" else None
        neurons = allocation.neurons if config.target != "head" else None
    else:
        one_scale = on_one_scale(config.criteria)
        if config.target != "mlp":
            heads = select_units([s[0] for s in scores], config.head_ratio, config.mode, config.min_keep,
                                 one_scale=one_scale)
        if config.target != "head":
            neurons = select_units([s[1] for s in scores], config.mlp_ratio, config.mode, config.min_keep,
                                   config.round_to, one_scale=one_scale)
    out = {}
    for i, block in enumerate(masks.layout.blocks):
        for name, m in masks.block_masks(block).items():
            new = torch.ones_like(m)
            if ".attn." in name and heads is not None:
                unit_keep = torch.zeros(block.num_heads, dtype=torch.bool, device=m.device)
                unit_keep[heads[i].to(m.device)] = True
                view = head_view(name, new, block)
                shape = (1, -1, 1, 1) if name.endswith("qkv.weight") else (1, -1, 1)
                view.mul_(unit_keep.view(shape))
            elif ".mlp." in name and neurons is not None:
                unit_keep = torch.zeros(block.hidden, dtype=torch.bool, device=m.device)
                unit_keep[neurons[i].to(m.device)] = True
                new.mul_(unit_keep.view(-1, 1) if name.endswith("fc1.weight") else unit_keep.view(1, -1))
            out[name] = new
    return PruneMasks(out, masks.layout), allocation


def structured_prune(model: nn.Module, masks: PruneMasks, criteria: str | Criterion, head_ratio: float,
                     mlp_ratio: float, target: str = "both",
                     rewind_to: Mapping[str, torch.Tensor] | None = None, *, data: Iterable[Any] | None = None,
                     device: torch.device | str | None = None, **regroup_config: Any) -> PruneMasks:
    """The research code's combined step (`prune_model_custom_fillback`), corrected.

    Regroups `masks` into quasi-structured masks with `criteria` (`regroup_config`: the other
    `RegroupConfig` fields). Without `rewind_to` it only returns them (the RSST use: training goes
    on and the penalty fades the dropped weights). With `rewind_to`, a state dict of initial
    weights, it loads a copy of those weights (never aliases them), applies the structured masks
    and returns them (the Refill use).
    """
    config = RegroupConfig(target=target, head_ratio=head_ratio, mlp_ratio=mlp_ratio, criteria=criteria,
                           **regroup_config)
    structured = regroup(model, masks, config, data=data, device=device)
    if rewind_to is not None:
        missing = set(model.state_dict()) - set(rewind_to)
        if missing:
            raise ConfigError(f"rewind_to lacks {len(missing)} entries, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(rewind_to[name])
        structured.apply_(model)
    return structured
