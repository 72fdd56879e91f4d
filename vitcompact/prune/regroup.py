"""Regroup element masks into quasi-structured head/neuron masks, and the Refill entry point."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..validate import ratio
from .criteria import ScoreContext, score_units
from .masks import PruneMasks, head_view
from .selection import select_units

TARGETS = ("head", "mlp", "both")


def regroup(model: nn.Module, masks: PruneMasks, target: str = "both", head_ratio: float = 0.0,
            mlp_ratio: float = 0.0, criteria: str = "magnitude", mode: str = "layer-wise",
            min_keep: int = 1, round_to: int = 1, data: Iterable[Any] | None = None,
            num_batches: int = 8, device: torch.device | str | None = None) -> PruneMasks:
    """Quasi-structured masks from element masks: whole heads and neurons kept or removed.

    `target` chooses what is pruned (`head`, `mlp` or `both`); the other part gets all-ones masks,
    so its weights are left untouched. Units are scored with the named criterion on the masked
    model (data-driven criteria need `data`, an iterable of (images, labels) batches) and selected
    per `mode` (see `selection`). `round_to` rounds kept MLP widths up to a multiple.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    head_ratio = ratio("head_ratio", head_ratio)
    mlp_ratio = ratio("mlp_ratio", mlp_ratio)
    masks.check_model(model)
    scores = score_units(model, masks, criteria, ScoreContext(data, num_batches, device))
    heads = select_units([s[0] for s in scores], head_ratio, mode, min_keep) if target != "mlp" else None
    neurons = (select_units([s[1] for s in scores], mlp_ratio, mode, min_keep, round_to)
               if target != "head" else None)
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
    return PruneMasks(out, masks.layout)


def structured_prune(model: nn.Module, masks: PruneMasks, criteria: str, head_ratio: float,
                     mlp_ratio: float, target: str = "both",
                     rewind_to: Mapping[str, torch.Tensor] | None = None, **regroup_args: Any) -> PruneMasks:
    """The research code's combined step (`prune_model_custom_fillback`), corrected.

    Regroups `masks` into quasi-structured masks with `criteria`. Without `rewind_to` it only
    returns them (the RSST use: training goes on and the penalty fades the dropped weights). With
    `rewind_to`, a state dict of initial weights, it loads a copy of those weights (never aliases
    them), applies the structured masks and returns them (the Refill use).
    """
    structured = regroup(model, masks, target=target, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
                         criteria=criteria, **regroup_args)
    if rewind_to is not None:
        missing = set(model.state_dict()) - set(rewind_to)
        if missing:
            raise ConfigError(f"rewind_to lacks {len(missing)} entries, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(rewind_to[name])
        structured.apply_(model)
    return structured
